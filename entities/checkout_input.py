"""What starts a checkout: its lines, its options and the cart and account it is for, and
the name and id of its workflow. The cart starts one (`entities/cart.py`); the saga itself is
`entities/checkout.py`, which sends the cart its report."""

from __future__ import annotations

from pydantic import BaseModel, Field
from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from entities.runtime.requests import RequestPolicy

CHECKOUT_WORKFLOW = "Checkout"


def checkout_workflow_id(checkout_id: str) -> str:
    """Readable, stable workflow id: `checkout:<cart id>-<attempt>`."""
    return f"checkout:{checkout_id}"


class CheckoutLine(BaseModel):
    sku: str
    quantity: int
    unit_price: int


class CheckoutOptions(BaseModel):
    """How a checkout holds stock and retries: forward steps give up after `step.attempts`,
    compensations and the final report are retried until they succeed or are refused."""

    reservation_ttl_seconds: float = Field(default=15 * 60, gt=0)
    step: RequestPolicy = Field(default_factory=RequestPolicy)
    compensation: RequestPolicy = Field(default_factory=lambda: RequestPolicy(attempts=0))
    operator_wait_seconds: float = Field(
        default=7 * 24 * 3600,
        gt=0,
        description="How long a FAILED checkout waits for an operator's retry or resolve, from "
        "each time it fails; then it ends FAILED, for good.",
    )


class CheckoutInput(BaseModel):
    checkout_id: str
    cart_id: str
    account_id: str
    lines: list[CheckoutLine]
    options: CheckoutOptions = Field(default_factory=CheckoutOptions)
    started_at: int | None = Field(
        default=None,
        description="The cart's incarnation (`CommandContext.incarnation`), or in checkouts "
        "of carts from before rules level 3 when the cart started the checkout, in epoch "
        "milliseconds. It joins the checkout id in the names of its requests, reservation "
        "and order, which must never meet those of an earlier checkout with the same id (of "
        "a cart whose id was used again once retention had deleted it), and must stay the "
        "same when a reset of the cart re-applies its `checkoutCart`. None in checkouts "
        "started before.",
    )

    @property
    def key(self) -> str:
        """What this checkout's requests, reservation and order are named after."""
        if self.started_at is None:
            return self.checkout_id
        return f"{self.checkout_id}.{self.started_at}"
