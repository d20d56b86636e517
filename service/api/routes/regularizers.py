"""GET /v1/regularizers: what tune.regularizer accepts."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from service.api.deps import current_owner
from service.api.problems import problem_responses
from service.contract import describe_regularizers
from service.schemas import RegularizerParam

router = APIRouter(prefix="/regularizers", tags=["regularizers"], dependencies=[Depends(current_owner)])


# exclude_unset: a parameter without fixed choices has no "choices" member (it is not null)
@router.get("", response_model=dict[str, dict[str, RegularizerParam]], response_model_exclude_unset=True,
            responses=problem_responses(401))
def list_regularizers() -> dict[str, dict[str, dict]]:
    """Every regularizer's parameters with defaults and meaning (tune.regularizer.params)."""
    return describe_regularizers()
