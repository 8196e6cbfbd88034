"""The card check the Hub's clients call before a push (`/api/validate-yaml`), served by
`loradock hub serve`: is a README's front matter metadata the registry can read."""

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from hub.cards import front_matter

router = APIRouter()


@router.post("/api/validate-yaml")
def validate_yaml(body: dict):
    try:
        front_matter(str(body.get("content", "")))
    except ValueError as e:
        return JSONResponse({"errors": [{"message": str(e)}]}, status_code=400)
    return {}
