"""A user's webhooks, served by `loradock hub serve` as the Hub serves them to huggingface_hub
(`create_webhook`, `list_webhooks`, `get_webhook`, `update_webhook`, `enable_webhook`,
`disable_webhook`, `delete_webhook`), and their delivery log (`GET .../{id}/deliveries`, newest
first). The store and its checks are `hub.webhooks`; the deliveries, `hub.delivery`."""

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from hub import views
from hub.routes.deps import CallerDep, paginate
from hub.schemas import WebhookBody
from hub.webhooks import Settings, Webhooks, check_settings, refuse_jobs

router = APIRouter()
PREFIX = "/api/settings/webhooks"


def get_webhooks(request: Request) -> Webhooks:
    return request.app.state.webhooks


WebhooksDep = Annotated[Webhooks, Depends(get_webhooks)]


def registry_addresses(request: Request) -> list[tuple[str, int]]:
    """Where this registry answers: the socket the request came in on, and the host its client named."""
    addresses = [tuple(request.scope["server"])] if request.scope.get("server") else []
    if request.url.hostname:
        addresses.append((request.url.hostname, request.url.port or (443 if request.url.scheme == "https" else 80)))
    return addresses


def settings_of(body: WebhookBody, request: Request, creating: bool) -> Settings:
    refuse_jobs(body.jobSourceId)
    return check_settings(body.url, body.watched, body.domains, body.secret, registry_addresses(request), creating)


@router.get(PREFIX)
def list_webhooks(webhooks: WebhooksDep, who: CallerDep):
    return [views.webhook(hook) for hook in webhooks.owned(who)]


@router.post(PREFIX)
def create_webhook(body: WebhookBody, request: Request, webhooks: WebhooksDep, who: CallerDep):
    webhooks.registry.require_write(who)  # 401 without a token before any check of the body
    return {"webhook": views.webhook(webhooks.create(who, settings_of(body, request, creating=True)))}


@router.get(PREFIX + "/{webhook_id}")
def get_webhook(webhook_id: str, webhooks: WebhooksDep, who: CallerDep):
    return {"webhook": views.webhook(webhooks.get(who, webhook_id))}


@router.post(PREFIX + "/{webhook_id}")
def update_webhook(webhook_id: str, body: WebhookBody, request: Request, webhooks: WebhooksDep, who: CallerDep):
    webhooks.get(webhooks.registry.require_write(who), webhook_id)  # 401 / 404 before any check of the body
    return {"webhook": views.webhook(webhooks.update(who, webhook_id, settings_of(body, request, creating=False)))}


@router.post(PREFIX + "/{webhook_id}/enable")
def enable_webhook(webhook_id: str, webhooks: WebhooksDep, who: CallerDep):
    return {"webhook": views.webhook(webhooks.set_disabled(who, webhook_id, False))}


@router.post(PREFIX + "/{webhook_id}/disable")
def disable_webhook(webhook_id: str, webhooks: WebhooksDep, who: CallerDep):
    return {"webhook": views.webhook(webhooks.set_disabled(who, webhook_id, True))}


@router.delete(PREFIX + "/{webhook_id}")
def delete_webhook(webhook_id: str, webhooks: WebhooksDep, who: CallerDep):
    webhooks.delete(who, webhook_id)
    return {}


@router.get(PREFIX + "/{webhook_id}/deliveries")
def deliveries(webhook_id: str, request: Request, webhooks: WebhooksDep, who: CallerDep):
    return paginate([views.delivery_attempt(a) for a in webhooks.attempts(who, webhook_id)], request)
