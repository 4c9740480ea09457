"""Fill the legacy schema with synthetic, French-looking data, deterministically by seed.

Everything is invented. Phone numbers lie in the ranges ARCEP reserves for
fiction (01 99 00 xx xx, 06 39 98 xx xx). One note, as in real practices,
starts with "carnet:" (a doctor's shorthand for the vaccination booklet): it
is plaintext that merely looks like carnet's text prefix, and `carnet migrate
plan` must report it.

    python examples/legacy_practice/generate.py --database-url sqlite:///legacy.db --seed 7
"""

from __future__ import annotations

import datetime as dt
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import sqlalchemy as sa

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from legacy_practice.schema import consultations, create, patients, practices  # noqa: E402

LAST = (
    "Martin",
    "Bernard",
    "Dubois",
    "Thomas",
    "Robert",
    "Richard",
    "Petit",
    "Durand",
    "Leroy",
    "Moreau",
    "Simon",
    "Laurent",
    "Lefebvre",
    "Michel",
    "Garcia",
    "David",
    "Bertrand",
    "Roux",
    "Vincent",
    "Fournier",
    "Morel",
    "Girard",
    "André",
    "Lefèvre",
    "Mercier",
    "Dupont",
    "Lambert",
    "Bonnet",
    "François",
    "Martinez",
    "Benali",
    "Nguyen",
    "Haddad",
    "Da Silva",
)
FIRST = (
    "Camille",
    "Léa",
    "Manon",
    "Chloé",
    "Inès",
    "Jeanne",
    "Louise",
    "Hélène",
    "Nathalie",
    "Sylvie",
    "Françoise",
    "Lucas",
    "Hugo",
    "Louis",
    "Jules",
    "Gabriel",
    "Arthur",
    "Thierry",
    "Philippe",
    "Michel",
    "Jean-Pierre",
    "Karim",
    "Mehdi",
    "Yasmine",
    "Fatima",
    "Océane",
)
CITIES = (
    "Lyon",
    "Nantes",
    "Rennes",
    "Lille",
    "Toulouse",
    "Bordeaux",
    "Montpellier",
    "Dijon",
    "Grenoble",
    "Angers",
    "Brest",
    "Limoges",
    "Metz",
    "Tours",
    "Amiens",
    "Besançon",
)
REASONS = (
    "renouvellement",
    "suivi",
    "certificat",
    "douleur",
    "fièvre",
    "bilan",
    "vaccination",
    "contrôle tension",
    "anxiété",
    "grossesse",
)
OPENINGS = (
    "Patient(e) vu(e) ce jour pour {reason}.",
    "Consultation de {reason}, accompagné(e) de son conjoint.",
    "Revient pour {reason} après notre dernier échange.",
    "Téléconsultation : {reason}.",
)
FINDINGS = (
    "TA {sys}/{dia}, pouls {pulse}, examen sans particularité.",
    "HbA1c à {hba1c} %, objectif non atteint, on majore la metformine à {dose} mg.",
    "Humeur basse depuis {weeks} semaines, troubles du sommeil, idées noires niées.",
    "Lombalgie mécanique depuis {weeks} semaines, pas de signe de gravité.",
    "Sevrage tabagique : {cigs} cigarettes par jour, substituts nicotiniques proposés.",
    "Grossesse de {weeks} SA, échographie prévue, sérologies en cours.",
    "Évoque des violences conjugales, orientée vers une association, à revoir sous {weeks} jours.",
    "Consommation d'alcool à {cigs} verres par jour, intervention brève réalisée.",
    "Anxiété au travail, arrêt de {weeks} jours, sertraline {dose} mg discutée.",
)
CLOSINGS = (
    "À revoir dans {weeks} semaines.",
    "Bilan sanguin prescrit, à rappeler au {phone}.",
    "Courrier au cardiologue.",
    "Pas de changement de traitement.",
    "",
)
LOOKALIKE = "carnet: vaccinations à jour, rappel DTP prévu en {year}."


def _phone(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return f"01 99 00 {rng.randint(0, 99):02d} {rng.randint(0, 99):02d}"
    return f"06 39 98 {rng.randint(0, 99):02d} {rng.randint(0, 99):02d}"


def note(rng: random.Random, reason: str) -> str:
    fig: dict[str, Any] = {
        "reason": reason,
        "sys": rng.randint(105, 175),
        "dia": rng.randint(60, 105),
        "pulse": rng.randint(52, 110),
        "hba1c": round(rng.uniform(5.8, 10.5), 1),
        "dose": rng.choice((50, 100, 500, 850, 1000)),
        "weeks": rng.randint(1, 30),
        "cigs": rng.randint(2, 30),
        "phone": _phone(rng),
    }
    parts = [rng.choice(OPENINGS), *rng.sample(FINDINGS, rng.randint(1, 3)), rng.choice(CLOSINGS)]
    return " ".join(p.format(**fig) for p in parts if p)


def rows(
    seed: int, n_practices: int, n_patients: int, n_consultations: int, lookalike: bool = True
) -> Iterator[tuple[sa.Table, list[dict[str, Any]]]]:
    rng = random.Random(seed)  # noqa: S311 - reproducible fake data, not secrets
    yield (
        practices,
        [
            {"id": i, "name": f"Cabinet médical {rng.choice(LAST)}", "city": rng.choice(CITIES)}
            for i in range(1, n_practices + 1)
        ],
    )
    yield (
        patients,
        [
            {
                "id": i,
                "practice_id": rng.randint(1, n_practices),
                "last_name": rng.choice(LAST),
                "first_name": rng.choice(FIRST),
                "birth_date": dt.date(1935, 1, 1) + dt.timedelta(days=rng.randint(0, 32000)),
                "phone": _phone(rng) if rng.random() < 0.9 else None,
            }
            for i in range(1, n_patients + 1)
        ],
    )
    start = dt.datetime(2024, 1, 2, 8, 0)
    batch: list[dict[str, Any]] = []
    for i in range(1, n_consultations + 1):
        reason = rng.choice(REASONS)
        roll = rng.random()
        comment = None if roll < 0.08 else note(rng, reason)
        if lookalike and i == 3:
            comment = LOOKALIKE.format(year=2027 + rng.randint(0, 3))
        batch.append(
            {
                "id": i,
                "patient_id": rng.randint(1, n_patients),
                "happened_at": start + dt.timedelta(minutes=20 * i),
                "reason": reason,
                "comment": comment,
            }
        )
        if len(batch) == 5000:
            yield consultations, batch
            batch = []
    if batch:
        yield consultations, batch


def populate(
    engine: sa.Engine,
    seed: int = 7,
    practices_n: int = 3,
    patients_n: int = 40,
    consultations_n: int = 300,
    lookalike: bool = True,
) -> None:
    create(engine)
    with engine.begin() as conn:
        for table, batch in rows(seed, practices_n, patients_n, consultations_n, lookalike):
            conn.execute(table.insert(), batch)


@click.command()
@click.option("--database-url", envvar="CARNET_DATABASE_URL", required=True)
@click.option("--seed", type=int, default=7, show_default=True)
@click.option("--practices", type=int, default=3, show_default=True)
@click.option("--patients", type=int, default=40, show_default=True)
@click.option("--consultations", type=int, default=300, show_default=True)
@click.option("--no-lookalike", is_flag=True, help="Leave out the note starting with 'carnet:'.")
def main(
    database_url: str,
    seed: int,
    practices: int,
    patients: int,
    consultations: int,
    no_lookalike: bool,
) -> None:
    """Create the legacy schema and fill it with synthetic data."""
    engine = sa.create_engine(database_url)
    populate(engine, seed, practices, patients, consultations, not no_lookalike)
    engine.dispose()
    click.echo(
        f"{practices} practices, {patients} patients, {consultations} consultations (seed {seed})"
    )


if __name__ == "__main__":
    main()
