"""Encrypt the plaintext columns of an existing database, online and resumably.

See docs/migration.md for the runbook. The CLI (``carnet migrate``) is a thin
layer over these calls.
"""

from .plan import Plan, build_plan
from .residue import ResidueReport, compact
from .run import RunResult, Verification, finish, run_migration, verify
from .target import JoinStep, Target, TenantPath, resolve

__all__ = [
    "JoinStep",
    "Plan",
    "ResidueReport",
    "RunResult",
    "Target",
    "TenantPath",
    "Verification",
    "build_plan",
    "compact",
    "finish",
    "resolve",
    "run_migration",
    "verify",
]
