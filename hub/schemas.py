"""Request bodies of the registry's JSON routes (what huggingface_hub sends)."""

import base64
import binascii

from pydantic import BaseModel, Field


class CreateRepo(BaseModel):
    name: str
    organization: str | None = None
    visibility: str | None = None  # "private" | "public"
    private: bool | None = None  # older clients
    type: str | None = None


class DeleteRepo(BaseModel):
    name: str
    organization: str | None = None
    type: str | None = None


class TagBody(BaseModel):
    tag: str
    message: str | None = None


class PreuploadFile(BaseModel):
    path: str
    sample: str = ""  # base64 of the first 512 bytes
    size: int = Field(ge=0)

    def sample_bytes(self) -> bytes:
        try:
            return base64.b64decode(self.sample, validate=True)
        except (binascii.Error, ValueError):
            return b""


class Preupload(BaseModel):
    files: list[PreuploadFile]
    gitIgnore: str | None = None


class LfsObject(BaseModel):
    oid: str
    size: int = Field(ge=0)


class LfsBatch(BaseModel):
    operation: str
    objects: list[LfsObject]
    transfers: list[str] | None = None
    hash_algo: str | None = None
    ref: dict | None = None
