"""What `loradock hub serve` answers for the parts of the Hub API it does not implement, and for
any other route: an error that says what is not supported and what to do, with `X-Error-Code`
(`NotSupported`, or `RouteNotFound` for a path the Hub API does not have either), so that a
missing feature never reads like a typo in a repo id. Mounted last: it matches whatever the
other routers did not."""

from fastapi import APIRouter, Request

from hub import errors
from hub.routes.deps import error_response

router = APIRouter()

XET = ("Xet storage is not supported by this registry: it takes uploads through Git LFS. Set HF_HUB_DISABLE_XET=1 "
       "in the environment of the uploading process (before huggingface_hub is imported) and upload again; "
       "loradock's own commands set it themselves")
XET_FIX_PATH = "/xet-is-not-supported-here--set-HF_HUB_DISABLE_XET=1-and-upload-again"
FEATURES = {  # a path segment of the Hub API -> what this registry says of it
    "discussions": "discussions and pull requests are not supported by this registry; commit to a branch instead",
    "xet-read-token": XET, "xet-write-token": XET, XET_FIX_PATH.strip("/"): XET,
    "lfs-files": "listing and purging LFS files is not supported by this registry; `loradock hub gc` reclaims "
                 "the space of files no commit references",
    "safetensors-metadata": "safetensors metadata is not served by this registry; download the file's header instead",
    "likes": "likes are not supported by this registry", "likers": "likes are not supported by this registry",
    "spaces": "Spaces are not supported by this registry: it stores model and dataset repos",
    "collections": "collections are not supported by this registry",
    "buckets": "buckets are not supported by this registry",
}


@router.api_route("/api/{kind:kind}/{namespace}/{name}/xet-{access}-token/{revision:path}", methods=["GET", "POST"])
def xet_token(kind: str, namespace: str, name: str, access: str, revision: str):
    """hf_xet, which uploads for huggingface_hub whenever it is installed, shows the URL of a failed
    request but not the body: the answer redirects to a URL that names the fix, and says it too."""
    response = error_response(501, XET, "NotSupported")
    response.status_code = 307
    response.headers["Location"] = XET_FIX_PATH
    return response


@router.api_route("/{path:path}", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
                  include_in_schema=False)
def unsupported(path: str, request: Request):
    segments = path.split("/")
    for segment in segments:
        if segment in FEATURES:
            raise errors.NotSupported(FEATURES[segment])
    return error_response(404, f"this registry has no route {request.method} /{path}: it serves the part of the "
                               "Hub API that huggingface_hub uses for model and dataset repos (see the README's "
                               "registry section)", "RouteNotFound")
