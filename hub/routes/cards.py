"""The card check the Hub's clients call before a push (`/api/validate-yaml`), served by
`loradock hub serve`: is a README's front matter metadata the registry can read.

It parses what it is sent, so it is for token holders only, takes at most MAX_CARD_REQUEST bytes,
and runs in a worker thread (a plain `def` route), never on the event loop."""

import json
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from hub import errors
from hub.cards import MAX_FRONT_MATTER, field_problems, front_matter
from hub.routes.deps import CallerDep, error_response

MAX_CARD_REQUEST = 1 << 20  # bytes of a validate-yaml request: a README with room to spare

router = APIRouter()


async def card_request(request: Request, who: CallerDep) -> bytes:
    """The request body of a token holder, refused past MAX_CARD_REQUEST bytes (hub.server.LimitBody
    has read it already, under the registry's own limit).

    Raises:
        Unauthorized: no token.
        TooLarge: the body is over MAX_CARD_REQUEST bytes.
    """
    if who is None:
        raise errors.Unauthorized("validate-yaml needs a token on this registry: huggingface_hub's RepoCard.validate "
                                  "and ModelCard.push_to_hub send none, so upload the README with HfApi.upload_file "
                                  "(it checks the card with your token) or `loradock push`")
    body = await request.body()
    if len(body) > MAX_CARD_REQUEST:
        raise errors.TooLarge(f"a validate-yaml request of {len(body)} bytes is over the {MAX_CARD_REQUEST} byte "
                              f"limit: only a card's front matter is checked, and it may be {MAX_FRONT_MATTER} bytes")
    return body


@router.post("/api/validate-yaml")
def validate_yaml(body: Annotated[bytes, Depends(card_request)]):
    """`{}` when the README in `content` has front matter the registry reads, each field the Hub defines
    of its type (`hub.cards.HUB_FIELDS`); otherwise a 400 with the Hub's `errors` list, which `HfApi`
    shows before a push (it checks every README it uploads)."""
    try:
        request = json.loads(body)
    except (ValueError, RecursionError) as e:  # RecursionError: JSON nested too deep to read
        return refused(f"the validate-yaml request is not JSON: {e}")
    content = request.get("content", "") if isinstance(request, dict) else None
    if not isinstance(content, str):
        return refused('the validate-yaml request must be a JSON object with the README as a string in "content"')
    try:
        card = front_matter(content)
    except ValueError as e:
        return refused(str(e))
    if problems := field_problems(card):
        return refused(*problems)
    return {}


def refused(*messages: str) -> JSONResponse:
    """A 400 in the shape validate-yaml's clients read (`errors`, one per problem), and the Hub's (`error`)."""
    return error_response(400, "; ".join(messages), extra={"errors": [{"message": m} for m in messages]})
