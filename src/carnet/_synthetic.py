"""Synthetic French clinical notes for the demo, the benchmarks and tests.

Everything here is invented: names come from lists of common French first
names and surnames, birth dates are drawn at random, and phone numbers lie in
the ranges ARCEP reserves for fiction (01 99 00 xx xx, 06 39 98 xx xx), so no
output can reach or describe a real person. The same seed always yields the
same data, so a benchmark or a failing test can be replayed exactly.

Notes read like a general practitioner's free-text comments (the kind of text
whose leak motivates carnet): anxiety, depression follow-up, type 2 diabetes,
hypertension, pregnancy, paediatrics, low back pain, smoking cessation. Each
carries its own figures (blood pressure, HbA1c, doses, dates), so that a
sentence of one note rarely appears verbatim in another.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "TOPICS",
    "Dataset",
    "Note",
    "Patient",
    "Practice",
    "generate",
    "generate_notes",
    "note_text",
]

FIRST_NAMES_F = (
    "Camille",
    "Léa",
    "Manon",
    "Chloé",
    "Inès",
    "Sarah",
    "Jeanne",
    "Louise",
    "Alice",
    "Juliette",
    "Emma",
    "Anaïs",
    "Margaux",
    "Élodie",
    "Nathalie",
    "Isabelle",
    "Sylvie",
    "Monique",
    "Françoise",
    "Catherine",
    "Aurélie",
    "Claire",
    "Hélène",
    "Lucie",
    "Mathilde",
    "Pauline",
    "Zoé",
    "Yasmine",
    "Fatima",
    "Nadia",
    "Sophie",
    "Brigitte",
    "Martine",
    "Odile",
    "Agathe",
    "Valérie",
)
FIRST_NAMES_M = (
    "Lucas",
    "Hugo",
    "Louis",
    "Gabriel",
    "Arthur",
    "Jules",
    "Nathan",
    "Thomas",
    "Théo",
    "Paul",
    "Antoine",
    "Maxime",
    "Nicolas",
    "Julien",
    "Mehdi",
    "Karim",
    "Pierre",
    "Jean",
    "Michel",
    "Philippe",
    "Alain",
    "Bernard",
    "Christophe",
    "Sébastien",
    "Olivier",
    "Yann",
    "Rémi",
    "Mathis",
    "Adam",
    "Raphaël",
    "Bruno",
    "Didier",
    "Gérard",
    "Laurent",
    "Samir",
    "Étienne",
)
LAST_NAMES = (
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
    "Legrand",
    "Garnier",
    "Faure",
    "Rousseau",
    "Blanc",
    "Guérin",
    "Muller",
    "Henry",
    "Roussel",
    "Nicolas",
    "Perrin",
    "Morin",
    "Mathieu",
    "Clément",
    "Gauthier",
    "Dumont",
    "Lopez",
    "Fontaine",
    "Chevalier",
    "Robin",
    "Masson",
    "Sanchez",
    "Gérard",
    "Nguyen",
    "Boyer",
    "Denis",
    "Lemaire",
    "Duval",
    "Joly",
    "Gautier",
    "Roger",
    "Roche",
    "Roy",
    "Noël",
    "Meyer",
    "Lucas",
    "Meunier",
    "Jean",
    "Perez",
    "Marchand",
    "Dufour",
    "Blanchard",
    "Marie",
    "Barbier",
    "Brun",
    "Dumas",
    "Brunet",
    "Schmitt",
    "Leroux",
    "Colin",
    "Fernandez",
    "Pierre",
    "Renard",
    "Arnaud",
    "Rolland",
    "Caron",
    "Aubert",
    "Giraud",
    "Leclerc",
    "Vidal",
    "Bourgeois",
    "Renaud",
    "Lemoine",
    "Picard",
    "Gaillard",
    "Philippe",
    "Leclercq",
    "Lacroix",
    "Fabre",
    "Dupuis",
    "Olivier",
    "Rodriguez",
    "Da Silva",
    "Hubert",
    "Louis",
    "Charles",
    "Guillot",
    "Rivière",
    "Le Gall",
    "Guillaume",
    "Adam",
    "Rey",
    "Moulin",
    "Gonzalez",
    "Berger",
    "Lecomte",
    "Ménard",
    "Fleury",
    "Deschamps",
    "Carpentier",
    "Julien",
    "Benoît",
    "Paris",
    "Maillard",
    "Marchal",
    "Aubry",
    "Vasseur",
    "Le Roux",
    "Renault",
    "Jacquet",
    "Collet",
    "Prévost",
    "Poirier",
    "Charpentier",
    "Royer",
    "Huet",
    "Baron",
    "Dupuy",
    "Pons",
    "Paul",
    "Laine",
    "Carré",
    "Breton",
    "Rémy",
    "Schneider",
    "Perrot",
    "Guyot",
    "Barre",
    "Marty",
    "Cousin",
    "Haddad",
    "Benali",
    "Mansouri",
    "Traoré",
    "Diallo",
    "Tran",
    "Le Goff",
)
CITIES = (
    "Lyon",
    "Nantes",
    "Lille",
    "Rennes",
    "Dijon",
    "Grenoble",
    "Tours",
    "Angers",
    "Reims",
    "Amiens",
    "Limoges",
    "Brest",
    "Metz",
    "Nîmes",
    "Pau",
    "Poitiers",
    "Besançon",
    "Caen",
)
PRACTICE_KINDS = ("Cabinet médical", "Maison de santé", "Centre de santé", "Cabinet de groupe")
STREETS = (
    "des Tilleuls",
    "Victor Hugo",
    "de la Gare",
    "Pasteur",
    "Jean Jaurès",
    "des Lilas",
    "du Marché",
    "Gambetta",
    "de la République",
    "des Écoles",
)

TOPICS = (
    "anxiete",
    "depression",
    "diabete",
    "hypertension",
    "grossesse",
    "pediatrie",
    "lombalgie",
    "tabac",
)


@dataclass(frozen=True)
class Practice:
    id: str
    name: str
    city: str


@dataclass(frozen=True)
class Patient:
    id: int
    practice_id: str
    first_name: str
    last_name: str
    sex: str
    birth_date: dt.date
    phone: str

    def __repr__(self) -> str:
        # Synthetic, but shaped like identity data: keep it out of test and log output.
        return f"<Patient {self.id} practice={self.practice_id}>"


@dataclass(frozen=True)
class Note:
    patient_id: int
    practice_id: str
    written_at: dt.date
    author: str
    topic: str
    text: str

    def __repr__(self) -> str:
        return (
            f"<Note patient={self.patient_id} practice={self.practice_id} {len(self.text)} chars>"
        )


@dataclass(frozen=True)
class Dataset:
    practices: list[Practice]
    patients: list[Patient]
    notes: list[Note]


# -- building blocks ---------------------------------------------------------------------------


def _pick(rng: random.Random, seq: tuple[str, ...]) -> str:
    return seq[rng.randrange(len(seq))]


def _date_fr(d: dt.date) -> str:
    return d.strftime("%d/%m/%Y")


def _dec(rng: random.Random, lo: float, hi: float, digits: int = 1) -> str:
    return f"{rng.uniform(lo, hi):.{digits}f}".replace(".", ",")


def _phone(rng: random.Random) -> str:
    # ARCEP's ranges for fiction: no real subscriber can hold these numbers.
    if rng.random() < 0.7:
        return f"06 39 98 {rng.randrange(100):02d} {rng.randrange(100):02d}"
    return f"01 99 00 {rng.randrange(100):02d} {rng.randrange(100):02d}"


def _weeks(rng: random.Random) -> str:
    return _pick(rng, ("2 semaines", "3 semaines", "1 mois", "6 semaines", "2 mois", "3 mois"))


_Gen = Callable[[random.Random, Patient, dt.date], list[str]]


def _anxiete(rng: random.Random, p: Patient, when: dt.date) -> list[str]:
    trigger = _pick(
        rng,
        (
            "un conflit au travail avec sa hiérarchie",
            "la séparation récente d'avec son conjoint",
            "des difficultés financières depuis la perte de son emploi",
            "le décès de sa mère en début d'année",
            "la préparation d'un concours",
            "un déménagement imposé",
            "des tensions familiales autour de la garde des enfants",
        ),
    )
    return [
        f"Consulte pour anxiété majorée depuis {_weeks(rng)}, en lien avec {trigger}.",
        _pick(
            rng,
            (
                "Décrit des ruminations le soir, des réveils à 4 h et une oppression thoracique "
                "sans lien avec l'effort.",
                "Crises d'angoisse environ deux fois par semaine, avec palpitations et sensation "
                "d'étouffement, surtout dans les transports.",
                "Irritabilité, difficultés de concentration, tensions musculaires cervicales.",
            ),
        ),
        f"Score GAD-7 à {rng.randint(9, 19)}. Pas d'idées suicidaires exprimées ce jour.",
        _pick(
            rng,
            (
                "Proposition de thérapie cognitivo-comportementale ; hydroxyzine "
                f"{rng.choice((25, 50))} mg le soir si besoin, pas plus de dix jours.",
                f"Introduction de sertraline {rng.choice((25, 50))} mg/j, information sur le délai "
                "d'action et les effets indésirables.",
                "Arrêt de travail de 7 jours discuté puis refusé par le patient ; exercices de "
                "cohérence cardiaque expliqués.",
            ),
        ),
        f"Revoir dans {_weeks(rng)}.",
    ]


def _depression(rng: random.Random, p: Patient, when: dt.date) -> list[str]:
    drug = _pick(rng, ("escitalopram", "sertraline", "venlafaxine", "mirtazapine", "fluoxétine"))
    dose = rng.choice((10, 15, 20, 50, 75, 100))
    since = _date_fr(when - dt.timedelta(days=rng.randint(30, 400)))
    tolerance = _pick(rng, ("bonne", "correcte", "médiocre"))
    side = _pick(
        rng,
        (
            "nausées les premiers jours, disparues",
            "prise de poids de 2 kg",
            "somnolence matinale",
            "pas d'effet indésirable signalé",
        ),
    )
    mood = _pick(rng, ("nettement améliorée", "fluctuante", "toujours basse", "un peu meilleure"))
    sleep = _pick(rng, ("retrouvé", "encore fragmenté", "trop long, se lève à midi"))
    return [
        f"Suivi de l'épisode dépressif caractérisé diagnostiqué le {since}.",
        f"Sous {drug} {dose} mg/j, tolérance {tolerance} ; {side}.",
        f"Humeur {mood}, sommeil {sleep}, PHQ-9 à {rng.randint(5, 22)}.",
        _pick(
            rng,
            (
                "Évoque des idées noires passives sans scénario ; a accepté le numéro 3114 et un "
                "rendez-vous au CMP.",
                "Pas d'idées suicidaires. Reprise progressive du travail à mi-temps thérapeutique.",
                "Consommation d'alcool en hausse le week-end, abordée sans jugement.",
                "Soutien de sa sœur, qui l'accompagne aux consultations.",
            ),
        ),
        f"Poursuite du traitement, réévaluation dans {_weeks(rng)}.",
    ]


def _diabete(rng: random.Random, p: Patient, when: dt.date) -> list[str]:
    extra = _pick(
        rng, ("", ", dapagliflozine 10 mg", ", sitagliptine 100 mg", ", sémaglutide 0,5 mg/sem")
    )
    return [
        f"Diabète de type 2 connu depuis {rng.randint(2005, 2023)}. "
        f"HbA1c à {_dec(rng, 6.1, 9.8)} % (précédente {_dec(rng, 6.1, 9.8)} %).",
        f"Poids {rng.randint(62, 128)} kg, IMC {_dec(rng, 23, 41)}, tour de taille "
        f"{rng.randint(84, 132)} cm. TA {rng.randint(118, 165)}/{rng.randint(68, 98)}.",
        f"Traitement : metformine {rng.choice((500, 850, 1000))} mg x{rng.choice((2, 3))}{extra}.",
        _pick(
            rng,
            (
                "Examen des pieds : monofilament perçu partout, pas de plaie.",
                "Hypoesthésie de la plante du pied gauche, orientation podologue.",
                "Fond d'œil de l'an dernier sans rétinopathie ; à refaire.",
            ),
        ),
        f"Créatinine {rng.randint(58, 140)} µmol/L, microalbuminurie "
        f"{_pick(rng, ('négative', 'positive à 45 mg/L', 'à contrôler'))}.",
        f"Objectifs revus avec le patient ; bilan à refaire dans {_weeks(rng)}.",
    ]


def _hypertension(rng: random.Random, p: Patient, when: dt.date) -> list[str]:
    drug = _pick(
        rng,
        (
            "amlodipine 5 mg",
            "ramipril 5 mg",
            "périndopril 4 mg",
            "irbésartan 150 mg",
            "indapamide 1,5 mg",
        ),
    )
    extra = _pick(rng, ("", " + hydrochlorothiazide 12,5 mg", " + bisoprolol 2,5 mg"))
    plan = _pick(
        rng, ("Pas de modification", "Majoration de dose", "Changement de classe", "MAPA demandée")
    )
    return [
        f"Contrôle tensionnel : {rng.randint(128, 178)}/{rng.randint(76, 104)} mmHg au cabinet, "
        f"automesure moyenne {rng.randint(122, 160)}/{rng.randint(72, 96)}.",
        f"Sous {drug}{extra}.",
        _pick(
            rng,
            (
                "Observance irrégulière, oublis fréquents le week-end.",
                "Bonne observance, sel réduit, marche 30 minutes par jour.",
                "Se plaint d'œdèmes des chevilles le soir depuis l'augmentation de dose.",
                "Toux sèche depuis trois semaines, à rapporter à l'IEC ?",
            ),
        ),
        f"Kaliémie {_dec(rng, 3.4, 5.3)} mmol/L, DFG {rng.randint(48, 104)} mL/min.",
        f"{plan} ; revoir dans {_weeks(rng)}.",
    ]


def _grossesse(rng: random.Random, p: Patient, when: dt.date) -> list[str]:
    weeks = rng.randint(8, 38)
    due = _date_fr(when + dt.timedelta(weeks=41 - weeks))
    scan = _date_fr(when + dt.timedelta(days=rng.randint(5, 40)))
    urine = _pick(rng, ("négative", "traces de protéines", "leucocytes +"))
    plan = _pick(
        rng,
        (
            "dépistage du diabète gestationnel prescrit",
            "supplémentation en fer poursuivie",
            "vaccin coqueluche proposé",
        ),
    )
    return [
        f"Grossesse de {weeks} SA + {rng.randint(0, 6)} j, "
        f"G{rng.randint(1, 4)}P{rng.randint(0, 3)}. Date prévue d'accouchement : {due}.",
        f"TA {rng.randint(98, 142)}/{rng.randint(58, 92)}, poids {rng.randint(52, 96)} kg "
        f"(+{rng.randint(1, 16)} kg), BU {urine}.",
        _pick(
            rng,
            (
                "Nausées en amélioration, fatigue marquée.",
                "Mouvements actifs perçus, pas de contractions, pas de métrorragies.",
                "Inquiétude au sujet de la toxoplasmose : sérologie négative, règles "
                "hygiéno-diététiques rappelées.",
                "Évoque des violences verbales du conjoint ; informée des ressources (3919), "
                "souhaite en reparler seule.",
            ),
        ),
        f"Échographie {_pick(rng, ('T1', 'T2', 'T3'))} le {scan} ; {plan}.",
    ]


def _pediatrie(rng: random.Random, p: Patient, when: dt.date) -> list[str]:
    months = rng.randint(2, 140)
    age = f"{months} mois" if months < 24 else f"{months // 12} ans"
    with_ = _pick(rng, ("sa mère", "son père", "sa grand-mère", "ses deux parents"))
    reason = _pick(
        rng,
        (
            "fièvre depuis 48 h",
            "toux nocturne",
            "examen systématique",
            "douleurs abdominales",
            "éruption cutanée",
        ),
    )
    vaccines = _pick(rng, ("à jour", "rappel ROR à prévoir", "méningocoque B à discuter"))
    again = _pick(
        rng,
        (
            "si la fièvre persiste au-delà de 72 h",
            "au prochain examen obligatoire",
            "dans 15 jours",
        ),
    )
    return [
        f"Enfant de {age} vu avec {with_} pour {reason}.",
        f"Poids {_dec(rng, 4.5, 38.0)} kg, taille {rng.randint(55, 145)} cm, "
        f"T° {_dec(rng, 36.6, 39.8)} °C.",
        _pick(
            rng,
            (
                "Tympans congestifs à droite, otite moyenne aiguë ; amoxicilline 80 mg/kg/j "
                "pendant 5 jours.",
                "Auscultation libre, rhinopharyngite virale ; lavages de nez et paracétamol.",
                "Courbes de croissance harmonieuses, développement psychomoteur normal.",
                "Parents séparés, l'enfant dort mal les semaines de garde alternée ; à suivre.",
            ),
        ),
        f"Vaccinations {vaccines}. Revoir {again}.",
    ]


def _lombalgie(rng: random.Random, p: Patient, when: dt.date) -> list[str]:
    kind = _pick(rng, ("aiguë", "subaiguë", "chronique"))
    cause = _pick(
        rng,
        (
            "un port de charge au travail",
            "un déménagement",
            "une chute dans l'escalier",
            "aucun facteur déclenchant",
        ),
    )
    where = _pick(rng, ("fessière", "dans la jambe gauche", "dans la jambe droite"))
    lasegue = _pick(rng, ("négatif", "positif à 45°", "positif à 60°"))
    return [
        f"Lombalgie {kind} depuis {_weeks(rng)} après {cause}.",
        f"EVA {rng.randint(3, 9)}/10, {_pick(rng, ('sans', 'avec'))} irradiation {where} ; "
        f"Lasègue {lasegue}.",
        _pick(
            rng,
            (
                "Pas de signe de gravité, pas de trouble sphinctérien.",
                "Arrêt de travail de 5 jours, reprise avec aménagement du poste conseillée.",
                "Kinésithérapie prescrite, 10 séances ; rester actif.",
            ),
        ),
        f"Ibuprofène {rng.choice((200, 400))} mg si besoin, paracétamol 1 g x3. Réévaluation dans "
        f"{_weeks(rng)}.",
    ]


def _tabac(rng: random.Random, p: Patient, when: dt.date) -> list[str]:
    course = _pick(rng, ("pas de rechute", "une rechute à une soirée", "a repris 3 cigarettes/j"))
    return [
        f"Sevrage tabagique : fumait {rng.randint(8, 35)} cigarettes/j depuis l'âge de "
        f"{rng.randint(12, 22)} ans, soit environ {rng.randint(10, 55)} paquets-années.",
        f"Test de Fagerström à {rng.randint(3, 10)}. CO expiré {rng.randint(4, 32)} ppm.",
        f"Substituts : patch {rng.choice((7, 14, 21))} mg/24 h et gommes "
        f"{rng.choice((2, 4))} mg ; {course}.",
        _pick(
            rng,
            (
                "Consommation de cannabis le soir évoquée, souhaite l'arrêter aussi.",
                "Prise de poids redoutée, conseils diététiques donnés.",
                "Motivation forte : projet de grossesse avec sa compagne.",
            ),
        ),
        f"Prochain point dans {_weeks(rng)}.",
    ]


_GENERATORS: dict[str, _Gen] = {
    "anxiete": _anxiete,
    "depression": _depression,
    "diabete": _diabete,
    "hypertension": _hypertension,
    "grossesse": _grossesse,
    "pediatrie": _pediatrie,
    "lombalgie": _lombalgie,
    "tabac": _tabac,
}


def _topic_for(rng: random.Random, p: Patient, today: dt.date) -> str:
    age = (today - p.birth_date).days // 365
    if age < 12:
        return "pediatrie"
    choices = ["anxiete", "depression", "lombalgie", "tabac", "hypertension", "diabete"]
    if p.sex == "F" and 18 <= age <= 42:
        choices.append("grossesse")
    if age < 35:
        choices.remove("diabete")
    return rng.choice(choices)


_HISTORY = (
    "appendicectomie dans l'enfance",
    "asthme allergique",
    "fracture du poignet droit",
    "migraine sans aura",
    "hypothyroïdie substituée",
    "cholécystectomie",
    "eczéma atopique",
    "dépression du post-partum",
    "hernie discale L5-S1 opérée",
    "reflux gastro-œsophagien",
    "apnée du sommeil appareillée",
    "zona ophtalmique",
    "tuberculose traitée dans l'enfance",
)
_ALLERGIES = (
    "aucune allergie connue",
    "allergie à la pénicilline",
    "allergie aux AINS",
    "allergie à l'iode",
    "intolérance à la codéine",
    "allergie aux acariens",
)
_SOCIAL = (
    "Vit seul(e) au deuxième étage sans ascenseur",
    "Vit en couple, deux enfants",
    "Mère isolée de trois enfants",
    "Retraité(e), veuf/veuve depuis peu",
    "Travaille de nuit comme aide-soignant(e)",
    "Chauffeur routier, souvent absent",
    "Étudiant(e), logé(e) chez ses parents",
    "Agriculteur/agricultrice, horaires très chargés",
    "En recherche d'emploi depuis huit mois",
    "Enseignant(e) en arrêt depuis la rentrée",
)


def _context(rng: random.Random) -> str:
    history = rng.sample(_HISTORY, rng.randint(1, 3))
    habits = _pick(
        rng, ("ne boit pas", "alcool occasionnel", "deux verres de vin par jour", "tabac sevré")
    )
    return (
        f"ATCD : {', '.join(history)} ; {_pick(rng, _ALLERGIES)}. {_pick(rng, _SOCIAL)}, {habits}."
    )


def note_text(rng: random.Random, patient: Patient, topic: str, when: dt.date) -> str:
    """One free-text note about ``patient`` on ``topic``, dated ``when``."""
    title = "Mme" if patient.sex == "F" else "M."
    opening = _pick(
        rng,
        (
            f"{title} {patient.last_name}, vu(e) ce jour ({_date_fr(when)}).",
            f"Consultation du {_date_fr(when)}, {patient.first_name} {patient.last_name}.",
            f"{patient.first_name} {patient.last_name}, né(e) le {_date_fr(patient.birth_date)}.",
        ),
    )
    body = _GENERATORS[topic](rng, patient, when)
    parts = [opening, *body]
    if topic != "pediatrie":
        parts.insert(1, _context(rng))
    return " ".join(parts)


# -- data sets -------------------------------------------------------------------------------

_TODAY = dt.date(2026, 3, 2)  # fixed, so that a seed gives the same ages and dates every year


def _practices(rng: random.Random, n: int) -> list[Practice]:
    out = []
    for i in range(n):
        city = _pick(rng, CITIES)
        name = f"{_pick(rng, PRACTICE_KINDS)} {_pick(rng, STREETS)}, {city}"
        out.append(Practice(id=f"cab-{i + 1:03d}", name=name, city=city))
    return out


def _patient(rng: random.Random, pid: int, practice_id: str) -> Patient:
    sex = "F" if rng.random() < 0.52 else "M"
    first = _pick(rng, FIRST_NAMES_F if sex == "F" else FIRST_NAMES_M)
    birth = _TODAY - dt.timedelta(days=rng.randint(60, 92 * 365))
    return Patient(
        id=pid,
        practice_id=practice_id,
        first_name=first,
        last_name=_pick(rng, LAST_NAMES),
        sex=sex,
        birth_date=birth,
        phone=_phone(rng),
    )


def _doctor(rng: random.Random) -> str:
    return f"Dr {_pick(rng, LAST_NAMES)}"


def generate(
    seed: int = 0,
    *,
    practices: int = 5,
    patients: int = 1000,
    notes_per_patient: tuple[int, int] = (1, 5),
) -> Dataset:
    """A deterministic data set: practices, their patients, and notes about them."""
    if practices < 1 or patients < 0:
        raise ValueError("need at least one practice and a non-negative patient count")
    lo, hi = notes_per_patient
    if not 0 <= lo <= hi:
        raise ValueError("notes_per_patient must be (low, high) with 0 <= low <= high")
    rng = random.Random(seed)  # noqa: S311 - reproducible fake data, not secrets
    pracs = _practices(rng, practices)
    doctors = {p.id: [_doctor(rng) for _ in range(rng.randint(1, 4))] for p in pracs}
    pats: list[Patient] = []
    notes: list[Note] = []
    for i in range(patients):
        practice = pracs[rng.randrange(len(pracs))]
        patient = _patient(rng, i + 1, practice.id)
        pats.append(patient)
        when = _TODAY - dt.timedelta(days=rng.randint(200, 900))
        for _ in range(rng.randint(lo, hi)):
            when += dt.timedelta(days=rng.randint(7, 120))
            topic = _topic_for(rng, patient, when)
            notes.append(
                Note(
                    patient_id=patient.id,
                    practice_id=practice.id,
                    written_at=when,
                    author=rng.choice(doctors[practice.id]),
                    topic=topic,
                    text=note_text(rng, patient, topic, when),
                )
            )
    return Dataset(practices=pracs, patients=pats, notes=notes)


def generate_notes(count: int, *, seed: int = 0, tenants: int = 20) -> list[Note]:
    """Exactly ``count`` notes spread evenly (round robin) over ``tenants`` practices."""
    if count < 0 or tenants < 1:
        raise ValueError("need a non-negative count and at least one tenant")
    rng = random.Random(seed)  # noqa: S311 - reproducible fake data, not secrets
    ids = [f"cab-{i + 1:03d}" for i in range(tenants)]
    notes: list[Note] = []
    for i in range(count):
        practice_id = ids[i % tenants]
        patient = _patient(rng, i + 1, practice_id)
        when = _TODAY - dt.timedelta(days=rng.randint(0, 900))
        topic = _topic_for(rng, patient, when)
        notes.append(
            Note(
                patient_id=patient.id,
                practice_id=practice_id,
                written_at=when,
                author=_doctor(rng),
                topic=topic,
                text=note_text(rng, patient, topic, when),
            )
        )
    return notes
