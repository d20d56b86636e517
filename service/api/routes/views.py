"""Read-only views of a finished job that are too large for GET /v1/jobs/{id}, which is polled: the feature map."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import OwnerDep, PathText, SessionsDep, owned_job
from service.api.problems import Problem, ProblemDetail, problem_responses
from service.schemas import FeatureMapOut

router = APIRouter(prefix="/jobs/{job_id}", tags=["jobs"])


@router.get("/feature-map", responses={**problem_responses(401, 404, 422),
                                       409: {"model": ProblemDetail, "description": "The job is not ranked yet"}})
def get_feature_map(job_id: PathText, sessions: SessionsDep, who: OwnerDep) -> FeatureMapOut:
    """Each candidate's features on the ranked rows in 2-D (PCA), with each row's label: computed once by the
    worker as part of the ranking. 409 until the job is ranked."""
    with sessions() as session:
        job = owned_job(session, job_id, who)
        summary = job.ranking_summary
    if summary is None:
        raise Problem(409, "job not ranked yet", f"job {job_id} is {job.status}; the feature map comes with "
                      "its ranking")
    if not summary.get("feature_map"):
        raise Problem(404, "no feature map", f"job {job_id} was ranked before feature maps were recorded")
    return FeatureMapOut.model_validate(summary["feature_map"])
