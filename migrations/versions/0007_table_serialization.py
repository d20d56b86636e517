"""datasets.serialization: a table uploaded with feature_columns, its rows written as LIFT sentences

The sentences are the dataset's text, as a text dataset's; this column records how they were written (the feature
columns in order, the first sentences) for the dataset's response.

Revision ID: 0007
Revises: 0006
"""
import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.add_column(sa.Column("serialization", sa.JSON(), nullable=True))


def downgrade() -> None:
    # the sentences stay the datasets' text: the old schema ranks and tunes them as text datasets. A plain DROP
    # COLUMN (SQLite 3.35+): batch mode would rebuild the table, which the jobs' foreign keys forbid.
    op.drop_column("datasets", "serialization")
