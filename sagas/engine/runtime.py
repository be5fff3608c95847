"""The engine service: consumes replies, fires timers, commits decisions in batches, publishes the outbox.

    async with Engine(store=store, broker=broker, definitions=[order_saga]) as engine:
        saga_id = await engine.start("order", {"order_id": "o-1"}, key="o-1")
        instance = await engine.wait(saga_id)

Loops (all asyncio tasks of one process):
- consumer: fetches replies from the broker and queues them;
- writer: takes whatever is queued (replies, timers, starts, operator commands) and applies it in ONE transaction
  (group commit); only after the commit are broker deliveries acknowledged and new messages handed to
- publisher: publishes committed outbox rows in commit order; their ids are marked sent in the next commit;
- relay: publishes outbox rows that nobody published (a crash between commit and publish, or rows written by the
  CLI), which is how the engine resumes in-flight sagas after a restart;
- timers: fires due timers (step timeouts, retry backoff, saga deadlines) as events.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, TypeVar

import structlog

from sagas.definitions.model import SagaDefinition
from sagas.definitions.registry import DefinitionRegistry
from sagas.definitions.schema import validate_start
from sagas.engine.ids import new_id
from sagas.engine.ports import (
    CHECKPOINT_INTERVAL,
    NO_OBSERVER,
    Broker,
    Checkpoints,
    Consumer,
    Observer,
    OutboxMessage,
    Store,
    TopicCreator,
)
from sagas.engine.processor import (
    DEAD_LETTER_MAX_BYTES,
    DEFAULT_KNOWN_MAX,
    Item,
    ItemResult,
    OperatorItem,
    Processor,
    ReplyItem,
    StartItem,
    TimerItem,
)
from sagas.engine.state import OperatorCommand, SagaInstance
from sagas.engine.supervise import LoopHealth, Supervisor, probe_all
from sagas.errors import BrokerError, SagaError, StoreError, UnknownSaga

log = structlog.get_logger("sagas.engine")

T = TypeVar("T")

DEFAULT_REPLY_TOPIC = "sagas.replies"
DEFAULT_GROUP = "sagas-engine"


_gc_saved: list[tuple[int, int, int]] = []  # the thresholds before the first running engine raised them


def _raise_gc_threshold(threshold: int) -> None:
    current = gc.get_threshold()
    _gc_saved.append(current)
    if current[0] < threshold:
        gc.set_threshold(threshold, current[1], current[2])


def _restore_gc_threshold() -> None:
    saved = _gc_saved.pop()
    if not _gc_saved:
        gc.set_threshold(*saved)


class Clock(Protocol):
    def now(self) -> float: ...


class SystemClock:
    def now(self) -> float:
        return time.time()


@dataclass(frozen=True)
class EngineSettings:
    reply_topic: str = DEFAULT_REPLY_TOPIC
    group: str = DEFAULT_GROUP
    batch_max: int = 512
    fetch_max: int = 512
    relay_interval: float = 1.0
    relay_grace: float = 2.0
    """Rows younger than this are left to the fast path (they are being published by the writer)."""
    timer_interval: float | None = 0.05
    """None: timers fire only through `fire_due_timers()` (the test harness drives a virtual clock)."""
    known_max: int = DEFAULT_KNOWN_MAX
    """Running sagas the processor remembers between events, so that their next event needs no read (least recently
    written forgotten first; settled sagas as soon as they settle); 0 remembers none."""
    outage_backoff_max: float = 5.0
    outage_log_after: float = 5.0
    """Seconds a publish may stay unacknowledged before the engine logs the broker as unavailable."""
    retention: float | None = None
    """Seconds to keep inbox ids, sent outbox rows and finished sagas' history; None keeps everything."""
    retention_interval: float = 600.0
    dead_letter_retention: float | None = None
    """Seconds to keep dead letters (longer than `retention`: they wait for an operator); None keeps them."""
    dead_letter_max_bytes: int = DEAD_LETTER_MAX_BYTES
    """What a dead letter keeps of a message's body; its full size and SHA-256 are always kept."""
    gc_threshold: int | None = 50_000
    """While an engine runs, the cyclic garbage collector's first threshold is at least this (None: leave it).

    Every event allocates a few dozen small objects (pydantic values, dicts, futures) that reference-counting frees.
    At Python's default of 700, a batch of a few hundred events sets off a young collection every few events, and
    the objects it finds alive (the batch still in progress) are promoted and scanned again by the older
    generations: a third of the event loop's CPU in `bench/saga_throughput.py`. At 50,000 a young collection runs
    about once a thousand sagas. Process-wide: restored when the last running engine stops.
    """


def _identify(item: Item) -> dict[str, Any]:
    """What a log line says of the item it is about: its saga, and the message or timer."""
    if isinstance(item, ReplyItem):
        return {"saga_id": item.message.header("ce_subject"), "step": item.message.header("ce_sagastep"),
                "attempt": item.message.header("ce_sagaattempt"), "message_id": item.message.header("ce_id")}
    if isinstance(item, TimerItem):
        spec = item.spec
        return {"saga_id": spec.saga_id, "step": spec.step, "attempt": spec.attempt, "timer_id": spec.id}
    if isinstance(item, StartItem):
        return {"saga_id": item.saga_id}
    return {"saga_id": item.saga_id, "action": item.command.action}


@dataclass
class _Pending:
    item: Item
    future: asyncio.Future[ItemResult] | None = None


class Engine:
    """Runs sagas. Use as `async with`; `start()`/`stop()` for explicit control."""

    def __init__(
        self,
        *,
        store: Store,
        broker: Broker,
        definitions: Sequence[SagaDefinition] = (),
        settings: EngineSettings | None = None,
        clock: Clock | None = None,
        observer: Observer | None = None,
    ) -> None:
        """`observer` is told what the engine did after each commit, publish, outage and loop failure (metrics,
        tracing); by default nothing is."""
        self.store = store
        self.observer: Observer = observer or NO_OBSERVER
        self.broker = broker
        self.settings = settings or EngineSettings()
        self.clock: Clock = clock or SystemClock()
        self.registry = DefinitionRegistry()
        for definition in definitions:
            self.registry.register(definition)
        self._definitions = list(definitions)
        self.processor = Processor(
            store,
            self.registry,
            reply_topic=self.settings.reply_topic,
            known_max=self.settings.known_max,
            # Half the retention: a margin for clocks that differ between the hosts of a group.
            known_max_age=None if self.settings.retention is None else self.settings.retention / 2,
            publishing=True,
            observer=self.observer,
            dead_letter_max_bytes=self.settings.dead_letter_max_bytes,
        )
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue(maxsize=20_000)
        self._publish_queue: asyncio.Queue[list[OutboxMessage]] = asyncio.Queue()
        self._sent: list[str] = []
        self._in_flight: set[str] = set()  # outbox ids handed to the publisher, not yet marked sent
        self._timers_in_flight: set[str] = set()
        self._waiters: dict[str, list[asyncio.Future[SagaInstance]]] = {}
        self._load_requests: dict[str, list[asyncio.Future[SagaInstance | None]]] = {}
        self._loads: set[asyncio.Future[None]] = set()
        self._loops = Supervisor("engine", backoff_max=self.settings.outage_backoff_max,
                                 on_failure=self.observer.loop_failed)
        self._consumer: Consumer | None = None
        self._stopping = asyncio.Event()
        self._busy = 0
        self._store_down_since: float | None = None
        self._gc_raised = False
        self.stats = {"batches": 0, "items": 0, "published": 0, "relayed": 0, "timers": 0}

    # ---- lifecycle ----------------------------------------------------------------------------------

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        await self.store.initialize()
        for definition in self._definitions:
            await self.store.save_definition(definition)
        await self.broker.start()
        await self._create_topics(list(self.registry))
        self._consumer = await self.broker.subscribe([self.settings.reply_topic], self.settings.group)
        self._stopping.clear()
        # A restarted Engine object must not trust what it believed in flight before: the store is the truth.
        self._in_flight.clear()
        self._timers_in_flight.clear()
        self.processor.forget()
        self._loops.spawn("writer", self._writer_loop)
        self._loops.spawn("publisher", self._publisher_loop)
        self._loops.spawn("consumer", self._consumer_loop)
        self._loops.spawn("relay", self._relay_loop)
        timer_interval, retention = self.settings.timer_interval, self.settings.retention
        if timer_interval is not None:
            self._loops.spawn("timers", lambda: self._timer_loop(timer_interval))
        if isinstance(self.store, Checkpoints) and self.store.needs_checkpoints():
            self._loops.spawn("checkpoint", self._checkpoint_loop)
        if retention is not None or self.settings.dead_letter_retention is not None:
            self._loops.spawn("retention", lambda: self._retention_loop(retention, self.settings.dead_letter_retention))
        if self.settings.gc_threshold is not None and not self._gc_raised:
            _raise_gc_threshold(self.settings.gc_threshold)
            self._gc_raised = True
        log.info("engine started", definitions=[d.identity for d in self._definitions],
                 reply_topic=self.settings.reply_topic)

    async def stop(self) -> None:
        """Stop consuming, finish what is queued, publish what is committed, and leave the consumer group."""
        if not self._loops.running:
            return
        self._stopping.set()
        for name in ("consumer", "timers", "relay", "retention", "checkpoint"):
            await self._loops.cancel(name)
        await self._drain()
        for name in ("writer", "publisher"):
            await self._loops.cancel(name)
        while not self._queue.empty():  # not drained in time: callers must hear so rather than wait forever
            pending = self._queue.get_nowait()
            if pending.future is not None and not pending.future.done():
                pending.future.set_exception(SagaError("engine stopped before this was processed"))
        if self._sent:
            with contextlib.suppress(SagaError):
                await self.store.mark_sent(self._sent, self.clock.now())
        if self._consumer is not None:
            await self._consumer.close()
        await self.broker.close()
        await self._loops.cancel_all()
        if self._gc_raised:
            _restore_gc_threshold()
            self._gc_raised = False
        log.info("engine stopped", **self.stats)

    # ---- API ----------------------------------------------------------------------------------------

    async def start_saga(
        self, name: str, input: dict[str, Any], *, key: str | None = None, saga_id: str | None = None
    ) -> str:
        """Start a saga on the latest version of `name`; idempotent by `key`. Returns the saga id.

        Raises:
            InvalidInput: the input, key or id is malformed or beyond a limit; nothing is written.
            IdempotencyConflict: `key` already started a saga of `name` with a different input.
        """
        definition = self.registry.get(name)
        validate_start(definition, input, key=key, saga_id=saga_id)
        result = await self._submit(StartItem(definition, saga_id or new_id(), input, key))
        assert result.instance is not None
        return result.instance.id

    async def deploy(self, definition: SagaDefinition) -> None:
        """Add a definition version; new sagas use the latest version, running ones keep theirs."""
        await self.store.save_definition(definition)
        self.registry.register(definition)
        if self._loops.running:
            await self._create_topics([definition])

    async def _create_topics(self, definitions: Sequence[SagaDefinition]) -> None:
        """Create the command topics of `definitions` and the reply topic before anything is published to them, on
        a broker that creates topics: a participant that subscribes first then finds its topic (docs/protocol.md)."""
        if isinstance(self.broker, TopicCreator):
            topics = {step.command_topic for definition in definitions for step in definition.iter_steps()}
            await self.broker.ensure_topics(sorted({*topics, self.settings.reply_topic}))

    async def operate(self, saga_id: str, command: OperatorCommand) -> SagaInstance:
        result = await self._submit(OperatorItem(saga_id, command))
        assert result.instance is not None
        return result.instance

    async def wait(self, saga_id: str, timeout: float | None = None, *, poll: float = 1.0) -> SagaInstance:
        """Until the saga is completed, compensated or parked.

        A batch of this engine wakes the waiter at once; every `poll` seconds the store is read as well, because
        another engine of the group (or an operator through the CLI) may be the one that settles it.
        """
        future: asyncio.Future[SagaInstance] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(saga_id, []).append(future)
        try:
            # Running as this engine last wrote it: no read (another writer settling it is what the polls are for).
            current = self.processor.remembered(saga_id) or await self._load_soon(saga_id)
            if current is None:
                raise UnknownSaga(f"no saga with id {saga_id!r}")
            if future.done():  # settled by a batch while we were reading
                return future.result()
            if current.status.is_settled:
                return current
            async with asyncio.timeout(timeout):
                while True:
                    done, _ = await asyncio.wait({future}, timeout=poll)
                    if done:
                        return future.result()
                    current = await self._load_soon(saga_id)
                    if current is None:  # removed meanwhile (retention, or never committed after all)
                        raise UnknownSaga(f"no saga with id {saga_id!r}")
                    if current.status.is_settled:
                        return current
        finally:
            waiters = self._waiters.get(saga_id)
            if waiters is not None and future in waiters:
                waiters.remove(future)
                if not waiters:
                    del self._waiters[saga_id]

    def _load_soon(self, saga_id: str) -> asyncio.Future[SagaInstance | None]:
        """The stored instance, read together with every other one asked for in the same turn of the event loop:
        a hundred callers of `wait` cost one store read, not a hundred."""
        loop = asyncio.get_running_loop()
        if not self._load_requests:
            loop.call_soon(self._load_requested)
        future: asyncio.Future[SagaInstance | None] = loop.create_future()
        self._load_requests.setdefault(saga_id, []).append(future)
        return future

    def _load_requested(self) -> None:
        requests, self._load_requests = self._load_requests, {}
        task = asyncio.ensure_future(self._load_many(requests))
        self._loads.add(task)
        task.add_done_callback(self._loads.discard)

    async def _load_many(self, requests: dict[str, list[asyncio.Future[SagaInstance | None]]]) -> None:
        try:
            found = await self.store.load(list(requests))
        except BaseException as exc:
            for futures in requests.values():
                for future in futures:
                    if future.done():
                        continue
                    if isinstance(exc, Exception):
                        future.set_exception(exc)
                    else:
                        future.cancel()
            if not isinstance(exc, Exception):
                raise
            return
        for saga_id, futures in requests.items():
            for future in futures:
                if not future.done():
                    future.set_result(found.get(saga_id))

    async def fire_due_timers(self) -> int:
        """Queue every timer due now; returns how many were queued."""
        now = self.clock.now()
        due = await self.store.due_timers(now, 1000)
        fresh = [t for t in due if t.id not in self._timers_in_flight]
        if fresh:
            self._tell(self.observer.timers_fired, fresh, now)
        for timer in fresh:
            self._timers_in_flight.add(timer.id)
            await self._queue.put(_Pending(TimerItem(timer)))
        self.stats["timers"] += len(fresh)
        return len(fresh)

    async def idle(self) -> bool:
        """True when nothing is queued, being committed or being published."""
        return self._queue.empty() and self._publish_queue.empty() and self._busy == 0

    # ---- loops --------------------------------------------------------------------------------------

    def health(self) -> dict[str, LoopHealth]:
        """The engine's loops: restarts, last error, whether each runs (what a health check reads)."""
        return self._loops.health()

    @property
    def healthy(self) -> bool:
        """Every loop runs, and none failed repeatedly within the last minute."""
        return self._loops.running and self._loops.healthy

    async def ready(self, timeout: float = 2.0) -> dict[str, str | None]:
        """Whether the store and the broker are reachable (and the schema at the newest migration): None for a
        component that is, the reason for one that is not. A store or broker without `probe` counts as ready."""
        return await probe_all({"store": self.store, "broker": self.broker}, timeout)

    async def _drain(self) -> None:
        deadline = time.monotonic() + 10
        # idle() combines three conditions (queue, publisher, batch in progress); no single event covers them.
        while not await self.idle() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)

    async def _submit(self, item: Item) -> ItemResult:
        future: asyncio.Future[ItemResult] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(item, future))
        result = await future
        if result.error is not None:
            raise result.error
        return result

    async def _writer_loop(self) -> None:
        while True:
            try:
                if self._queue.empty():
                    # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation that
                    # arrives as the queue hands over an item, and stop() would then wait for this task for ever.
                    async with asyncio.timeout(0.1):
                        first = await self._queue.get()
                else:  # queued already (while the last batch committed): no timer to arm and cancel
                    first = self._queue.get_nowait()
            except TimeoutError:
                if self._sent:
                    try:
                        await self._with_retry(lambda: self._commit_sent())
                    except Exception:  # kept in self._sent: the next commit marks them
                        log.exception("marking messages sent failed; will retry")
                continue
            self._busy += 1
            try:
                batch = [first]
                while len(batch) < self.settings.batch_max and not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                await self._run_batch(batch)
            except Exception as exc:
                await self._isolate(batch, exc)
            finally:
                self._busy -= 1

    async def _isolate(self, batch: list[_Pending], exc: Exception) -> None:
        """A batch failed, not on an outage (those are retried inside): something in it the engine cannot
        process. It must neither stop the engine nor hold back the rest of the batch: run its items one by one.
        Stopped half-way (the engine is stopping), every caller still waiting hears of it."""
        try:
            if len(batch) == 1:
                await self._failed(batch[0], exc)
                return
            log.exception("batch failed; processing its items one by one", items=len(batch))
            for pending in batch:
                try:
                    await self._run_batch([pending])
                except Exception as one:
                    await self._failed(pending, one)
        except BaseException as stopped:
            for pending in batch:
                if pending.future is not None and not pending.future.done():
                    pending.future.set_exception(SagaError(repr(stopped)))
            raise

    async def _failed(self, pending: _Pending, exc: Exception) -> None:
        """An item that failed on its own. A reply goes to the dead letters with the error, and is acknowledged:
        a consumer does not deliver it again while it lives, and held back it would stall its partition
        (`sagas dlq replay` sends it again once the cause is fixed); its saga carries on through the step's
        timeout. A timer fires again once its claim's lease runs out; a caller (start, operator command) gets
        the error."""
        item = pending.item
        log.error("item failed", item=type(item).__name__, error=repr(exc), exc_info=exc, **_identify(item))
        if isinstance(item, TimerItem):
            self._timers_in_flight.discard(item.spec.id)
        elif isinstance(item, ReplyItem):
            reason = f"processing failed: {exc!r}"[:1000]
            try:
                await self._with_retry(lambda: self.processor.dead_letter(item.message, reason, self.clock.now()))
            except Exception:
                log.exception("dead-lettering a reply failed; it stays unacknowledged")
            else:
                if item.delivery is not None and self._consumer is not None:
                    with contextlib.suppress(BrokerError):  # delivered again later: the dead letter is kept once
                        await self._consumer.commit([item.delivery])
        if pending.future is not None and not pending.future.done():
            pending.future.set_exception(exc)

    async def _commit_sent(self) -> None:
        sent, self._sent = self._sent, []
        try:
            await self.store.mark_sent(sent, self.clock.now())
        except BaseException:
            self._sent.extend(sent)
            raise
        self._in_flight.difference_update(sent)

    async def _run_batch(self, batch: list[_Pending]) -> None:
        sent, self._sent = self._sent, []
        items = [p.item for p in batch]
        try:
            outcome = await self.processor.process(items, self.clock.now, sent, retry=self._with_retry)
        except Exception:
            self._sent.extend(sent)
            raise  # the writer loop isolates the item that failed
        except BaseException as exc:
            self._sent.extend(sent)
            for pending in batch:
                if pending.future is not None and not pending.future.done():
                    pending.future.set_exception(SagaError(repr(exc)))
            raise
        self._sent.extend(outcome.unmarked)
        self._in_flight.difference_update(set(sent).difference(outcome.unmarked))
        self.stats["batches"] += 1
        self.stats["items"] += len(batch)
        if outcome.published:
            self._in_flight.update(m.id for m in outcome.published)
            self._publish_queue.put_nowait(outcome.published)
        deliveries = []
        for pending, result in zip(batch, outcome.results, strict=True):
            item = pending.item
            if isinstance(item, TimerItem):
                self._timers_in_flight.discard(item.spec.id)
            if isinstance(item, ReplyItem) and result.error is not None:
                # Not applied (it kept conflicting with another writer): try again, and do not acknowledge it,
                # or the reply would be gone without having been applied.
                log.warning("reply not applied; will retry", error=str(result.error))
                self._queue.put_nowait(pending)
                continue
            if isinstance(item, ReplyItem) and item.delivery is not None:
                deliveries.append(item.delivery)
            if pending.future is not None and not pending.future.done():
                pending.future.set_result(result)
        if deliveries and self._consumer is not None:
            try:
                await self._consumer.commit(deliveries)
            except BrokerError as exc:
                # Not fatal: the state is committed; the replies come again after a rebalance or a restart and
                # the inbox drops them. What this batch produced must still be published and its waiters woken.
                log.warning("broker unavailable; reply offsets not committed", error=str(exc),
                            replies=len(deliveries))
        for instance in outcome.settled:
            for waiter in self._waiters.pop(instance.id, []):
                if not waiter.done():
                    waiter.set_result(instance)

    async def _with_retry(self, call: Callable[[], Awaitable[T]]) -> T:
        """Retry store calls through an outage: log it once, back off, and carry on when it is back."""
        delay = 0.05
        while True:
            try:
                result = await call()
            except StoreError as exc:
                if not self._store_failed(exc):
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.outage_backoff_max)
                continue
            self._store_ok()
            return result

    def _store_failed(self, exc: StoreError) -> bool:
        """Note a failed store call; True when it is an outage. Whichever loop notices first logs it, once."""
        if not exc.retriable:
            return False
        if self._store_down_since is None:
            self._store_down_since = time.monotonic()
            log.error("store unavailable; retrying", error=str(exc))
            self._tell(self.observer.outage, "store", True)
        return True

    def _store_ok(self) -> None:
        if self._store_down_since is not None:
            outage = round(time.monotonic() - self._store_down_since, 1)
            self._store_down_since = None
            log.warning("store available again", outage_seconds=outage)
            self._tell(self.observer.outage, "store", False)

    def _tell(self, call: Callable[..., None], *args: Any) -> None:
        """Tell the observer something. One that raises is logged and ignored: after a publish the broker has the
        messages, and an observer's error there must not have them published again."""
        try:
            call(*args)
        except Exception:
            log.exception("observer failed", call=getattr(call, "__name__", repr(call)))

    async def _polling(self, call: Callable[[], Awaitable[Any]], interval: float, failed: str) -> None:
        """Run `call` every `interval` seconds for ever. A store outage is logged once (and its end) and backs
        off, as does a store error that is not an outage; any other error is unexpected and goes to the supervisor,
        which logs it once with its cause, counts the restart (what `health()` reports) and restarts the loop."""
        delay = interval
        while True:
            try:
                await call()
                self._store_ok()
                delay = interval
            except StoreError as exc:
                if not self._store_failed(exc):
                    log.error(failed, error=str(exc))
                delay = min(max(delay * 2, 0.05), self.settings.outage_backoff_max)
            await asyncio.sleep(delay)

    async def _publisher_loop(self) -> None:
        while True:
            messages = await self._publish_queue.get()
            self._busy += 1
            try:
                await self._publish(messages)
            except Exception:
                # One message the broker refuses for good (too large, topic not allowed) must not hold back the
                # others of its batch: publish them one by one.
                log.exception("publish failed; publishing the messages one by one", messages=len(messages))
                for message in messages:
                    await self._publish_alone(message)
            finally:
                self._busy -= 1

    async def _publish_alone(self, message: OutboxMessage) -> None:
        """Publish one message. One the broker refuses for good goes to the dead letters with the refusal and is
        marked sent in the same transaction: the relay would otherwise offer it again for ever, first in every
        batch (its saga's step times out and follows its retry policy). Any other failure leaves the row to the
        relay."""
        try:
            await self._publish([message])
        except Exception as exc:
            if not isinstance(exc, BrokerError) or exc.retriable:
                log.exception("publish failed; the relay will try again", message_id=message.id)
                return
            reason = f"refused by the broker: {exc}"[:1000]
            log.error("message refused by the broker; dead-lettered", message_id=message.id, reason=reason)
            try:
                await self._with_retry(
                    lambda: self.processor.dead_letter(message.message, reason, self.clock.now(), sent=[message.id])
                )
            except Exception:
                log.exception("dead-lettering a refused message failed; the relay will offer it again")
        finally:
            self._in_flight.discard(message.id)

    async def _publish(self, messages: list[OutboxMessage]) -> None:
        delay = 0.05
        outage_since: float | None = None
        began = time.monotonic()
        after = self.settings.outage_log_after

        def unacknowledged() -> None:
            nonlocal outage_since
            if outage_since is None:
                outage_since = time.monotonic() - after
                log.error("broker unavailable; retrying publish", messages=len(messages),
                          error=f"not acknowledged within {after:g}s")
                self._tell(self.observer.outage, "broker", True)

        loop = asyncio.get_running_loop()
        while True:
            # A broker client may wait out a lost connection inside publish() (aiokafka does, for up to its
            # request timeout) instead of raising: an unacknowledged publish is an outage too. A timer says so
            # while the publish goes on; awaited directly, a publish costs no task of its own and no extra turns of
            # the event loop (a batch of one saga publishes on every commit).
            late = loop.call_later(after, unacknowledged)
            try:
                await self.broker.publish([m.message for m in messages])
                break
            except SagaError as exc:
                if getattr(exc, "retriable", False) is False:
                    raise
                if outage_since is None:
                    outage_since = time.monotonic()
                    log.error("broker unavailable; retrying publish", error=str(exc), messages=len(messages))
                    self._tell(self.observer.outage, "broker", True)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.outage_backoff_max)
            finally:
                late.cancel()
        if outage_since is not None:
            log.warning("broker available again", outage_seconds=round(time.monotonic() - outage_since, 1))
            self._tell(self.observer.outage, "broker", False)
        self._sent.extend(m.id for m in messages)
        self._tell(self.observer.published, messages, time.monotonic() - began)
        self.stats["published"] += len(messages)

    async def _consumer_loop(self) -> None:
        assert self._consumer is not None
        delay = 0.05
        while True:
            try:
                deliveries = await self._consumer.fetch(self.settings.fetch_max, timeout=0.5)
            except SagaError as exc:
                log.error("broker fetch failed; retrying", error=str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.outage_backoff_max)
                continue
            delay = 0.05
            if deliveries:
                self._tell(self.observer.fetched, deliveries)
            for delivery in deliveries:
                await self._queue.put(_Pending(ReplyItem(delivery.message, delivery)))

    async def _relay_loop(self) -> None:
        await self._polling(self.relay_once, self.settings.relay_interval, "outbox relay failed; will retry")

    async def relay_once(self) -> int:
        """Publish committed outbox rows that the fast path did not (crash, CLI, lost publish)."""
        pending = await self.store.pending_outbox(1000, created_before=self.clock.now() - self.settings.relay_grace)
        orphans = [m for m in pending if m.id not in self._in_flight]
        if orphans:
            log.debug("relaying outbox rows", count=len(orphans))  # routine after every `sagas start` --db
            self._in_flight.update(m.id for m in orphans)
            await self._publish_queue.put(orphans)
            self.stats["relayed"] += len(orphans)
        return len(orphans)

    async def _retention_loop(self, retention: float | None, dead_letter_retention: float | None) -> None:
        async def purge() -> None:
            now = self.clock.now()
            # -inf: nothing is older than that (only dead letters have a horizon).
            older_than = -float("inf") if retention is None else now - retention
            dead_before = None if dead_letter_retention is None else now - dead_letter_retention
            removed = await self.store.purge(older_than, dead_letters_before=dead_before)
            if any((removed.inbox, removed.outbox, removed.history, removed.instances, removed.dead_letters)):
                log.info("retention clean-up", inbox=removed.inbox, outbox=removed.outbox,
                         history=removed.history, instances=removed.instances, dead_letters=removed.dead_letters)

        await self._polling(purge, self.settings.retention_interval, "retention clean-up failed; will retry")

    async def _checkpoint_loop(self) -> None:
        """The store's housekeeping (`Checkpoints`): a store error is logged and retried later; it says nothing of
        an outage's end (a call that found nothing to do did not reach the database)."""
        assert isinstance(self.store, Checkpoints)
        delay = CHECKPOINT_INTERVAL
        while True:
            try:
                await self.store.checkpoint()
                delay = CHECKPOINT_INTERVAL
            except StoreError as exc:
                if not self._store_failed(exc):
                    log.error("store checkpoint failed; will retry", error=str(exc))
                delay = min(max(delay * 2, CHECKPOINT_INTERVAL), self.settings.outage_backoff_max)
            await asyncio.sleep(delay)

    async def _timer_loop(self, interval: float) -> None:
        await self._polling(self.fire_due_timers, interval, "timer poll failed; will retry")
