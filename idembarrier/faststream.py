"""The barrier in front of any FastStream subscriber, and the relay publishing through a FastStream broker.

Needs the ``faststream`` extra. `BarrierMiddleware` runs each consumed message's subscriber once per
``idempotency-message-id``, in a unit of work whose session the subscriber takes from FastStream's context
(``session: AsyncSession = Context(SESSION)``), on Kafka, RabbitMQ, NATS or Redis alike; `FastStreamPublisher`
lets `idembarrier.messaging.OutboxRelay` publish through the same broker object::

    broker = RabbitBroker(url, middlewares=[BarrierMiddleware(barrier, group="billing")])

    @broker.subscriber("orders")
    async def bill(order: dict, session: AsyncSession = Context(SESSION)) -> dict:
        session.add(Invoice(order_id=order["id"]))
        return {"billed": order["id"]}
"""

from __future__ import annotations

from ._delivery import DeadLetter, DeadLetterTopic, MissingMessageId
from ._faststream import SESSION, BarrierMiddleware, FastStreamDelivery, FastStreamPublisher

__all__ = [
    "SESSION",
    "BarrierMiddleware",
    "DeadLetter",
    "DeadLetterTopic",
    "FastStreamDelivery",
    "FastStreamPublisher",
    "MissingMessageId",
]
