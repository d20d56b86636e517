"""api_keys.role and expires_at; models.owner and removed_at: admin and user keys, a user key's own catalog entries

Keys created before this revision become user keys (`hubtune keys create --admin`, or `hubtune keys set-role`,
makes an admin). Models registered before it stay in the shared catalog (owner ""), as they were. The unique
registration is now per owner, so two keys may each add the same hub repository to their own entries.

Revision ID: 0005
Revises: 0004
"""
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from alembic import op

import service.db

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


@contextmanager
def _foreign_keys_off() -> Iterator[None]:
    """SQLite rebuilds `models` to change its unique constraint (copy, drop, rename) while rankings and checkpoints
    reference it: with foreign keys enforced the drop fails. They are off during the rebuild (the pragma acts
    outside a transaction, as alembic runs SQLite's DDL) and every reference is checked after it."""
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        yield
        return
    op.execute("PRAGMA foreign_keys = OFF")
    try:
        yield
    finally:
        op.execute("PRAGMA foreign_keys = ON")
    broken = bind.exec_driver_sql("PRAGMA foreign_key_check").all()
    if broken:
        raise RuntimeError(f"rebuilding the models table broke {len(broken)} reference(s): {broken[:5]}")


def upgrade() -> None:
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("role", sa.String(length=16), nullable=False, server_default="user"))
        batch_op.add_column(sa.Column("expires_at", service.db.UTCDateTime(), nullable=True))
    with _foreign_keys_off(), op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.add_column(sa.Column("owner", sa.String(length=64), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("removed_at", service.db.UTCDateTime(), nullable=True))
        batch_op.drop_constraint("uq_models_source_locator_revision", type_="unique")
        batch_op.create_unique_constraint("uq_models_owner_source_locator_revision",
                                          ["owner", "source", "locator", "revision"])


def downgrade() -> None:
    private = op.get_bind().execute(sa.text("SELECT count(*) FROM models WHERE owner <> ''")).scalar()
    if private:  # the old schema would show them to every key, and deleting them is not a migration's call
        raise RuntimeError(f"{private} model(s) belong to one key; remove them (and their jobs) before downgrading")
    with _foreign_keys_off(), op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.drop_constraint("uq_models_owner_source_locator_revision", type_="unique")
        batch_op.create_unique_constraint("uq_models_source_locator_revision", ["source", "locator", "revision"])
        batch_op.drop_column("removed_at")
        batch_op.drop_column("owner")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_column("expires_at")
        batch_op.drop_column("role")
