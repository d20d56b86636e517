"""datasets.text_pair_column: text-pair datasets (premise and hypothesis, question and passage)

Revision ID: 0004
Revises: 0003
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.add_column(sa.Column("text_pair_column", sa.String(length=200), nullable=True))


def downgrade() -> None:
    pairs = op.get_bind().execute(sa.text("SELECT count(*) FROM datasets WHERE text_pair_column IS NOT NULL")).scalar()
    if pairs:  # the old schema would read them as single texts, and deleting a user's data is not a migration's call
        raise RuntimeError(f"{pairs} text-pair dataset(s) exist; delete them (and their jobs) before downgrading")
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.drop_column("text_pair_column")
