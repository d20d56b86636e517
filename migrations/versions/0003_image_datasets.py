"""datasets.modality and datasets.image_column: image datasets (zip of class folders, metadata, Parquet bytes)

text_column and label_column become nullable: an image dataset has no text column, and a zip of class folders
takes its labels from folder names.

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.add_column(sa.Column("modality", sa.String(length=16), nullable=False, server_default="text"))
        batch_op.add_column(sa.Column("image_column", sa.String(length=200), nullable=True))
        batch_op.alter_column("text_column", existing_type=sa.String(length=200), nullable=True)
        batch_op.alter_column("label_column", existing_type=sa.String(length=200), nullable=True)


def downgrade() -> None:
    images = op.get_bind().execute(sa.text("SELECT count(*) FROM datasets WHERE modality <> 'text'")).scalar()
    if images:  # the old schema cannot describe them, and deleting a user's data is not a migration's call
        raise RuntimeError(f"{images} image dataset(s) exist; delete them (and their jobs) before downgrading")
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.alter_column("label_column", existing_type=sa.String(length=200), nullable=False)
        batch_op.alter_column("text_column", existing_type=sa.String(length=200), nullable=False)
        batch_op.drop_column("image_column")
        batch_op.drop_column("modality")
