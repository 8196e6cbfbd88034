"""Request bodies of the registry's JSON routes (what huggingface_hub sends)."""

import base64
import binascii

from typing import Literal

from pydantic import BaseModel, Field, StrictBool, StrictInt, StrictStr


class CreateRepo(BaseModel):
    name: StrictStr
    organization: StrictStr | None = None
    visibility: Literal["private", "public"] | None = None
    private: StrictBool | None = None  # older clients
    type: StrictStr | None = None


class DeleteRepo(BaseModel):
    name: StrictStr
    organization: StrictStr | None = None
    type: StrictStr | None = None


class MoveRepo(BaseModel):
    fromRepo: StrictStr
    toRepo: StrictStr
    type: StrictStr = "model"


class RepoSettings(BaseModel):
    private: StrictBool | None = None
    visibility: Literal["private", "public"] | None = None
    gated: Literal["auto", "manual", False] | None = None


class WebhookBody(BaseModel):
    """`create_webhook` / `update_webhook`; `hub.webhooks.check_settings` checks the values."""

    url: StrictStr | None = None
    watched: list[dict] | None = None
    domains: list[StrictStr] | None = None
    secret: StrictStr | None = None
    jobSourceId: StrictStr | None = None


class TagBody(BaseModel):
    tag: StrictStr
    message: StrictStr | None = None


class BranchBody(BaseModel):
    startingPoint: StrictStr | None = None
    emptyBranch: StrictBool = False


class SquashBody(BaseModel):
    message: StrictStr = ""


class PreuploadFile(BaseModel):
    path: StrictStr
    sample: StrictStr = ""  # base64 of the first 512 bytes
    size: StrictInt = Field(ge=0, le=2**62)

    def sample_bytes(self) -> bytes:
        try:
            return base64.b64decode(self.sample, validate=True)
        except (binascii.Error, ValueError):
            return b""


class Preupload(BaseModel):
    files: list[PreuploadFile]
    gitIgnore: StrictStr | None = None


class LfsObject(BaseModel):
    oid: StrictStr
    size: StrictInt = Field(ge=0, le=2**62)


class LfsBatch(BaseModel):
    operation: StrictStr
    objects: list[LfsObject]
    transfers: list[str] | None = None
    hash_algo: str | None = None
    ref: dict | None = None
