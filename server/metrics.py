"""Prometheus metrics, read from the node at scrape time.

Nothing here runs per message: the node keeps plain integers (``Counters``
below, lists indexed by lane, fixed-bucket histograms: one bisect and three
additions per observation; small dicts keyed by label values of closed
sets for the rare events: refusals, admin requests) and
:class:`NodeCollector` turns them into metric families only when
``/metrics`` is scraped.  The SQLite writer's numbers come back with its
commits (store_writer.py), so a scrape does no I/O.  Gauges (connections, queued bytes, channels) are
computed by walking the live sessions at scrape time, O(connections).

Every family is prefixed ``tillwire_`` and every series, the process
collector's ``tillwire_process_*`` included, carries two labels: ``node``
(the node id) and ``worker`` (the process within the node: ``Node.worker``,
the index the supervisor gives each worker, ``0`` for the embedded
default).  Each worker exports only its own series: ``worker`` keeps them
apart, ``sum without (worker) (...)`` gives the node-wide view and
``sum without (node, worker) (...)`` the fleet's.  (The workers of a node
share its admin port, SO_REUSEPORT: one scrape reaches one of them.  A
single aggregating endpoint is possible without changing this module: one
process scrapes its siblings' text and concatenates it, the labels already
disambiguate.)  prometheus_client's multiprocess mode is deliberately not
used: it makes every counter increment a file write, which the hot paths
here cannot afford.

Families (``c`` counter, ``g`` gauge, ``h`` histogram):

* g ``tillwire_connections{tenant,role}`` authenticated sessions (a session
  counts once per role of its token); g ``tillwire_connections_unauthenticated``;
  g ``tillwire_connections_open`` every accepted socket not yet closed;
  c ``tillwire_connections_accepted_total``
* c ``tillwire_frames_received_total``, ``tillwire_bytes_received_total``
  (every frame and byte from terminals); c ``tillwire_writes_total``,
  ``tillwire_bytes_written_total`` (socket writes and their bytes)
* c ``tillwire_messages_in_total{lane,source}``,
  ``tillwire_message_bytes_in_total{lane,source}`` (messages received and
  their payload bytes: ``source="terminal"`` SEND frames, ``source="admin"``
  ``POST /v1/publish``; refused ones included, see below)
* c ``tillwire_messages_refused_total{source,code}`` messages refused with an
  ERROR code (terminal SENDs) or an admin publish answered 4xx/503 (its
  ``code`` when it has one, else ``HTTP_<status>``)
* c ``tillwire_dead_letters_total{lane,reason}`` P0/P1 entries dead-lettered:
  ``expired`` (TTL) or ``rejected`` (a NACK); c ``tillwire_redriven_total``
  dead letters put back in an inbox through the admin API
* c ``tillwire_messages_out_total{lane}``, ``tillwire_message_bytes_out_total{lane}``
  (P0/P1 deliveries including retransmits; P2/P3 fan-out: one per
  subscriber a broadcast was queued for; payload bytes)
* c ``tillwire_messages_accepted_total``, ``tillwire_duplicates_total``,
  ``tillwire_broadcasts_total``, ``tillwire_retransmits_total``
* g ``tillwire_queued_bytes`` outbound bytes waiting in sessions' queues;
  g ``tillwire_connections_write_paused`` sessions whose socket is backed up
* c ``tillwire_conflated_total``, ``tillwire_p2_dropped_total``,
  ``tillwire_p3_dropped_total`` (lane scheduler, all sessions so far)
* c ``tillwire_slow_consumer_closes_total``, ``tillwire_heartbeat_timeouts_total``,
  ``tillwire_auth_failures_total``, ``tillwire_auth_ok_total``,
  ``tillwire_acl_denials_total``, ``tillwire_takeovers_total``, ``tillwire_kicks_total``,
  ``tillwire_read_yields_total``, ``tillwire_flush_yields_total``
* g ``tillwire_connections_read_held{reason}`` connections not being read
  (backlog, pong, budget, answers, auth_delay); c ``tillwire_rate_waits_total``,
  ``tillwire_store_waits_total``,
  ``tillwire_rate_refusals_total``, ``tillwire_window_refusals_total``,
  ``tillwire_subscription_refusals_total``, ``tillwire_connections_refused_total``,
  ``tillwire_auth_delays_total``, ``tillwire_budget_holds_total``,
  ``tillwire_ping_holds_total`` (the limits, README "What one terminal may cost");
  c ``tillwire_audit_lines_total``, ``tillwire_audit_aggregated_total``,
  ``tillwire_audit_dropped_total``; g ``tillwire_pending_subscriptions``
* h ``tillwire_store_write_seconds`` time of each ``accept_many`` batch
* h ``tillwire_ack_latency_seconds`` P0/P1 delivery to ack, sampled: one
  in-flight message per inbox lane at a time
* g ``tillwire_tickets_unattended``, ``tillwire_tickets_waiting`` open tickets no
  escalation level had anyone for, and that reached no terminal yet
* h ``tillwire_delivery_latency_seconds{lane,stage}`` end to end, per P0/P1
  message: ``stage="written"`` from accepted (the server took the SEND or
  publish) to first handed to the terminal's connection (the trace's
  ``delivered_at``; messages that waited offline included), ``stage="acked"``
  from accepted to the terminal's ACK on the connection it was written to
* c ``tillwire_admin_requests_total{route,method,status}`` admin API calls
  (``route`` the route's pattern, ``unmatched`` for unknown paths)
* g ``tillwire_store_writer_queue`` store writes waiting for their commit;
  h ``tillwire_store_commit_seconds`` the SQLite writer's COMMIT times (SQLite
  backend only; the writer process's own numbers, as of its latest commit)
* c ``tillwire_tickets_total{event}`` (opened, escalated, resolved,
  unattended: a ticket or escalation that reached no one), g
  ``tillwire_tickets_open``; c ``tillwire_chat_conversations_total``,
  ``tillwire_chat_messages_total``; c ``tillwire_offers_capped_total``
  (offer deliveries withheld by the member frequency cap)
* g ``tillwire_inflight_messages``, ``tillwire_channels``, ``tillwire_registered_terminals``,
  ``tillwire_draining``, ``tillwire_uptime_seconds``, ``tillwire_gc_frozen_objects``,
  ``tillwire_gc_threshold`` (by generation)
* the process collector's ``tillwire_process_*`` (CPU, memory, file descriptors),
  with ``node`` and ``worker`` added at scrape time
"""

from __future__ import annotations

import bisect
import gc
import time

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder

from .connection import HOLD_ANSWERS, HOLD_AUTH, HOLD_BACKLOG, HOLD_BUDGET, HOLD_PONG


class Histogram:
    """A fixed-bucket histogram of seconds: one bisect and three int/float
    additions per observation (the collector below turns it into the
    Prometheus form at scrape time)."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds) -> None:
        self.bounds = tuple(bounds)              # upper bounds, ascending; +Inf implied
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1


STORE_WRITE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                       2.5, 5.0)
ACK_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                       10.0, 30.0)
# End to end, accepted -> written / acked: milliseconds for a live terminal,
# up to the lane's TTL (days) for one that was offline.
DELIVERY_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                            5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0, 21600.0, 86400.0)


TICKET_EVENTS = ("opened", "escalated", "resolved", "unattended")


class Counters:
    """Plain counters the metrics module reads (one object, no per-event cost).

    The ``lane_*`` lists are indexed by lane (P0..P3): SEND frames and their
    payload bytes received, and messages (and payload bytes) handed to
    terminals' lanes: P0/P1 deliveries (retransmits included) and P2/P3
    fan-out (one per subscriber the broadcast was queued for); ``admin_*``
    the same for admin publishes.  ``written`` and ``acked`` are one
    histogram per inbox lane (P0, P1), ``dead_*`` counts per inbox lane.
    The dicts (``refused``, ``admin_requests``, ``tickets``) are keyed by
    label values from closed sets (codes, routes, statuses, events): their
    size stays bounded.
    """

    __slots__ = ("connections", "auth_failures", "heartbeat_timeouts", "slow_consumer_closes",
                 "takeovers", "acl_denials", "frames_in", "deliveries", "broadcasts",
                 "accepted", "duplicates", "conflated", "p2_dropped", "p3_dropped",
                 "retransmits", "writes", "bytes_out", "protocol_errors", "bytes_in",
                 "auth_ok", "kicks", "lane_frames_in", "lane_bytes_in", "lane_frames_out",
                 "lane_bytes_out", "store_write", "ack_latency", "read_yields",
                 "flush_yields", "store_waits", "rate_waits", "rate_refusals", "window_refusals",
                 "connections_refused", "auth_delays", "budget_holds", "ping_holds",
                 "subscription_refusals", "admin_frames_in", "admin_bytes_in", "written",
                 "acked", "dead_expired", "dead_rejected", "redriven", "refused",
                 "admin_requests", "tickets", "chat_conversations", "chat_messages",
                 "offers_capped")

    _LISTS = ("lane_frames_in", "lane_bytes_in", "lane_frames_out", "lane_bytes_out",
              "admin_frames_in", "admin_bytes_in")

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)
        for name in self._LISTS:
            setattr(self, name, [0, 0, 0, 0])
        self.store_write = Histogram(STORE_WRITE_BUCKETS)    # seconds per accept_many batch
        self.ack_latency = Histogram(ACK_LATENCY_BUCKETS)    # P0/P1 delivery -> ack (sampled)
        # Accepted -> first written, accepted -> acked: one histogram per inbox lane.
        self.written = [Histogram(DELIVERY_LATENCY_BUCKETS) for _ in range(2)]
        self.acked = [Histogram(DELIVERY_LATENCY_BUCKETS) for _ in range(2)]
        self.dead_expired = [0, 0]                 # per inbox lane
        self.dead_rejected = [0, 0]
        self.refused: dict[tuple[str, str], int] = {}            # (source, code) -> n
        self.admin_requests: dict[tuple[str, str, int], int] = {}  # (route, method, status)
        self.tickets = dict.fromkeys(TICKET_EVENTS, 0)

    def refuse(self, source: str, code: str) -> None:
        """Count one message refused (``source`` terminal or admin, ``code`` its
        error code's name)."""
        key = (source, code)
        self.refused[key] = self.refused.get(key, 0) + 1

    def dead(self, letters) -> None:
        """Count dead letters (store.DeadLetter; reason "ttl" is an expiry)."""
        for d in letters:
            if d.reason == "ttl":
                self.dead_expired[d.lane] += 1
            else:
                self.dead_rejected[d.lane] += 1

    def as_dict(self) -> dict:
        out = {}
        for name in self.__slots__:
            value = getattr(self, name)
            if isinstance(value, list):
                value = [{"count": v.count, "sum": v.sum} if isinstance(v, Histogram) else v
                         for v in value]
            elif isinstance(value, Histogram):
                value = {"count": value.count, "sum": value.sum}
            elif isinstance(value, dict):
                value = {"/".join(map(str, k)) if isinstance(k, tuple) else k: v
                         for k, v in value.items()}
            out[name] = value
        return out


__all__ = ["NodeCollector", "make_registry", "render"]

LANES = ("P0", "P1", "P2", "P3")
HOLD_NAMES = {HOLD_BACKLOG: "backlog", HOLD_PONG: "pong", HOLD_BUDGET: "budget",
              HOLD_AUTH: "auth_delay", HOLD_ANSWERS: "answers"}


def _count_holds(holds: int, held: dict) -> None:
    for bit, name in HOLD_NAMES.items():
        if holds & bit:
            held[name] += 1


BASE_LABELS = ["node", "worker"]


def _buckets(bounds, counts, total: int) -> list[tuple[str, int]]:
    """Cumulative (le, count) pairs of per-bucket ``counts`` (one more than ``bounds``)."""
    buckets = []
    running = 0
    for bound, count in zip(bounds, counts):
        running += count
        buckets.append((repr(float(bound)), running))
    buckets.append(("+Inf", total))
    return buckets


def _histogram(name: str, doc: str, hist, w: list[str]) -> HistogramMetricFamily:
    fam = HistogramMetricFamily(name, doc, labels=BASE_LABELS)
    fam.add_metric(w, _buckets(hist.bounds, hist.counts, hist.count), hist.sum)
    return fam


class _Labelled:
    """A collector that adds ``node`` and ``worker`` to another's series
    (prometheus_client's process collector takes no labels of its own)."""

    def __init__(self, inner, node) -> None:
        self.inner = inner
        self.node = node

    def describe(self):
        return []

    def collect(self):
        labels = {"node": self.node.node_id, "worker": str(self.node.worker)}
        for fam in self.inner.collect():
            out = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            out.samples = [s._replace(labels={**labels, **s.labels}) for s in fam.samples]
            yield out


class NodeCollector:
    """A prometheus_client custom collector over one :class:`~tillwire.server.node.Node`."""

    def __init__(self, node) -> None:
        self.node = node

    def describe(self):
        return []        # families are only known at collect time; no eager collect

    def collect(self):
        node = self.node
        c = node.counters
        w = [node.node_id, str(node.worker)]

        def counter(name, doc, value):
            fam = CounterMetricFamily(f"tillwire_{name}", doc, labels=BASE_LABELS)
            fam.add_metric(w, value)
            return fam

        def gauge(name, doc, value):
            fam = GaugeMetricFamily(f"tillwire_{name}", doc, labels=BASE_LABELS)
            fam.add_metric(w, value)
            return fam

        # -- connections (walks the live sessions) ---------------------------------
        by_role: dict[tuple[str, str], int] = {}
        queued = 0
        paused = 0
        held = dict.fromkeys(HOLD_NAMES.values(), 0)
        for conn in list(node.hub.sessions.values()):
            claims = conn.claims
            if claims is not None:
                for role in claims.roles:
                    key = (claims.tenant, role)
                    by_role[key] = by_role.get(key, 0) + 1
            queued += conn.queued_bytes
            paused += conn.paused
            if conn.extra is not None:
                _count_holds(conn.holds, held)
        unauth = node.handshaking()
        for conn in unauth:
            queued += conn.queued_bytes
            if conn.extra is not None:
                _count_holds(conn.holds, held)
        fam = GaugeMetricFamily("tillwire_connections",
                                "Authenticated terminal sessions by tenant and role "
                                "(a session counts once per role).",
                                labels=[*BASE_LABELS, "tenant", "role"])
        for (tenant, role), n in sorted(by_role.items()):
            fam.add_metric([*w, tenant, role], n)
        yield fam
        yield gauge("connections_unauthenticated", "Connections still in their handshake.",
                    len(unauth))
        yield gauge("connections_open", "Accepted terminal sockets not yet closed.",
                    node.connection_count)
        yield counter("connections_accepted", "Terminal connections accepted.", c.connections)
        yield gauge("queued_bytes", "Outbound bytes queued in terminal sessions.", queued)
        yield gauge("connections_write_paused",
                    "Sessions whose socket is backed up (a slow link or terminal): their "
                    "lanes hold what they cannot take yet.", paused)
        fam = GaugeMetricFamily("tillwire_connections_read_held",
                                "Connections the server is not reading, by reason (a "
                                "connection held for two reasons counts under both).",
                                labels=[*BASE_LABELS, "reason"])
        for reason, n in held.items():
            fam.add_metric([*w, reason], n)
        yield fam

        # -- traffic -----------------------------------------------------------------
        yield counter("frames_received", "Frames received from terminals.", c.frames_in)
        yield counter("bytes_received", "Bytes received from terminals.", c.bytes_in)
        yield counter("writes", "Socket writes to terminals.", c.writes)
        yield counter("bytes_written", "Bytes written to terminals.", c.bytes_out)
        for name, doc, terminal, admin in (
            ("messages_in", "Messages received, by lane and source (terminal: SEND frames; "
             "admin: POST /v1/publish), refused ones included.", c.lane_frames_in,
             c.admin_frames_in),
            ("message_bytes_in", "Payload bytes of the messages received, by lane and source.",
             c.lane_bytes_in, c.admin_bytes_in),
        ):
            fam = CounterMetricFamily(f"tillwire_{name}", doc,
                                      labels=[*BASE_LABELS, "lane", "source"])
            for lane, t, a in zip(LANES, terminal, admin):
                fam.add_metric([*w, lane, "terminal"], t)
                fam.add_metric([*w, lane, "admin"], a)
            yield fam
        fam = CounterMetricFamily("tillwire_messages_refused",
                                  "Messages refused, by source and error code (admin: the "
                                  "publish's code, or HTTP_<status>).",
                                  labels=[*BASE_LABELS, "source", "code"])
        for (source, code), n in sorted(c.refused.items()):
            fam.add_metric([*w, source, code], n)
        yield fam
        fam = CounterMetricFamily("tillwire_dead_letters",
                                  "P0/P1 entries dead-lettered, by lane and reason (expired: "
                                  "their TTL passed undelivered or unacked; rejected: NACK).",
                                  labels=[*BASE_LABELS, "lane", "reason"])
        for lane in (0, 1):
            fam.add_metric([*w, LANES[lane], "expired"], c.dead_expired[lane])
            fam.add_metric([*w, LANES[lane], "rejected"], c.dead_rejected[lane])
        yield fam
        yield counter("redriven", "Dead letters put back in their terminal's inbox (admin "
                      "API).", c.redriven)
        for name, doc, values in (
            ("messages_out", "Messages handed to terminals' lanes, by lane (P0/P1 "
             "deliveries with retransmits, P2/P3 one per subscriber).", c.lane_frames_out),
            ("message_bytes_out", "Payload bytes handed to terminals' lanes, by lane.",
             c.lane_bytes_out),
        ):
            fam = CounterMetricFamily(f"tillwire_{name}", doc, labels=[*BASE_LABELS, "lane"])
            for lane, value in zip(LANES, values):
                fam.add_metric([*w, lane], value)
            yield fam
        yield counter("messages_accepted", "P0/P1 messages stored.", c.accepted)
        yield counter("duplicates", "P0/P1 sends recognised as resends (same sender and ref).",
                      c.duplicates)
        yield counter("broadcasts", "P2/P3 messages appended to channel streams.", c.broadcasts)
        yield counter("retransmits", "P0/P1 messages delivered again.", c.retransmits)

        # -- shedding and closes -------------------------------------------------------
        conflated, p2_dropped, p3_dropped = node.lane_totals()
        yield counter("conflated", "P2 messages replaced in a queue by a newer one (same key).",
                      conflated)
        yield counter("p2_dropped", "P2 messages shed from full queues.", p2_dropped)
        yield counter("p3_dropped", "P3 messages shed from full queues or expired.", p3_dropped)
        yield counter("slow_consumer_closes", "Sessions closed with SLOW_CONSUMER.",
                      c.slow_consumer_closes)
        yield counter("heartbeat_timeouts", "Sessions closed with HEARTBEAT_TIMEOUT.",
                      c.heartbeat_timeouts)
        yield counter("auth_failures", "Logins refused.", c.auth_failures)
        yield counter("auth_ok", "Logins accepted.", c.auth_ok)
        yield counter("acl_denials", "SEND and SUBSCRIBE requests refused as FORBIDDEN.",
                      c.acl_denials)
        yield counter("takeovers", "Sessions replaced by a newer login of the same terminal.",
                      c.takeovers)
        yield counter("kicks", "Sessions closed by an operator.", c.kicks)
        yield counter("read_yields", "Bursts whose rest waited for the next turn "
                      "(server.read_budget_ms).", c.read_yields)
        yield counter("flush_yields", "Write flushes whose rest of connections waited for "
                      "the next turn (server.flush_slice_ms).", c.flush_yields)

        # -- limits (PROTOCOL.md section 14) -------------------------------------------
        yield counter("store_waits", "P0/P1 SENDs whose connection was not read for a while "
                      "because too many messages waited for the store.", c.store_waits)
        yield counter("rate_waits", "SENDs and requests that waited for their connection's "
                      "token bucket (limits.send_rate, limits.request_rate).", c.rate_waits)
        yield counter("rate_refusals", "SENDs refused with RATE_LIMITED (they would have waited "
                      "longer than limits.send_wait_max).", c.rate_refusals)
        yield counter("window_refusals", "P0/P1 SENDs refused with TOO_MANY_UNACKED "
                      "(limits.unacked_sends).", c.window_refusals)
        yield counter("subscription_refusals", "SUBSCRIBEs refused with TOO_MANY_SUBSCRIPTIONS "
                      "(limits.max_subscriptions).", c.subscription_refusals)
        yield counter("connections_refused", "Connections refused with CONNECTION_LIMIT "
                      "(server.max_connections, limits.max_connections_per_*).",
                      c.connections_refused)
        yield counter("auth_delays", "Refused logins whose answer was held back (a source "
                      "address that kept failing: limits.auth_fail_delay_max).", c.auth_delays)
        yield counter("budget_holds", "Times a connection stopped being read because its "
                      "control frames passed their budget.", c.budget_holds)
        yield counter("ping_holds", "Times a connection's input waited for its PONG to go out.",
                      c.ping_holds)
        audit = node.audit
        if audit is not None:
            yield counter("audit_lines", "Audit log lines written.", audit.lines)
            yield counter("audit_aggregated", "Repeated failures summed into an audit summary "
                          "line instead of written one by one.", audit.aggregated)
            yield counter("audit_dropped", "Audit lines dropped because the writer fell "
                          "behind (and failed writes).", audit.dropped + audit.failures)

        # -- latency -------------------------------------------------------------------
        yield _histogram("tillwire_store_write_seconds",
                         "Time to store one batch of P0/P1 messages (accept_many).",
                         c.store_write, w)
        yield _histogram("tillwire_ack_latency_seconds",
                         "Time from handing a P0/P1 message to a terminal to its ack (sampled).",
                         c.ack_latency, w)

        fam = HistogramMetricFamily(
            "tillwire_delivery_latency_seconds",
            "End to end per P0/P1 message, by lane: from accepted to first written to the "
            "terminal's connection (stage=written) and to its ack (stage=acked).",
            labels=[*BASE_LABELS, "lane", "stage"])
        for stage, hists in (("written", c.written), ("acked", c.acked)):
            for lane, hist in zip(LANES, hists):
                fam.add_metric([*w, lane, stage],
                               _buckets(hist.bounds, hist.counts, hist.count), hist.sum)
        yield fam

        # -- the admin API and the store's writer ------------------------------------
        fam = CounterMetricFamily("tillwire_admin_requests",
                                  "Admin API requests, by route pattern, method and status.",
                                  labels=[*BASE_LABELS, "route", "method", "status"])
        for (route, method, status), n in sorted(c.admin_requests.items()):
            fam.add_metric([*w, route, method, str(status)], n)
        yield fam
        writer = getattr(node.store, "writer_metrics", None)
        if writer is not None:
            wm = writer()
            yield gauge("store_writer_queue", "Store writes waiting for their commit (queued "
                        "or in the writer's transaction).", wm["queue"])
            fam = HistogramMetricFamily("tillwire_store_commit_seconds",
                                        "Time of each COMMIT of the store's writer (as of its "
                                        "latest commit).", labels=BASE_LABELS)
            fam.add_metric(w, _buckets(wm["commit_bounds"], wm["commit_counts"],
                                       sum(wm["commit_counts"])), wm["commit_seconds"])
            yield fam
            yield counter("store_failed_commits", "Store writer transactions that failed.",
                          wm["failed_commits"])

        # -- retail services -----------------------------------------------------------
        fam = CounterMetricFamily("tillwire_tickets",
                                  "Ticket events: opened, escalated, resolved, unattended (a "
                                  "ticket or an escalation that reached no one).",
                                  labels=[*BASE_LABELS, "event"])
        for event, n in c.tickets.items():
            fam.add_metric([*w, event], n)
        yield fam
        yield gauge("tickets_open", "Tickets not resolved yet.", len(node.tickets.open))
        yield counter("chat_conversations", "Chat conversations started.", c.chat_conversations)
        yield counter("chat_messages", "Chat messages stored.", c.chat_messages)
        yield counter("offers_capped", "Offer deliveries withheld by a member's frequency cap.",
                      c.offers_capped)

        # -- state ---------------------------------------------------------------------
        yield gauge("inflight_messages", "P0/P1 messages delivered and not yet acknowledged.",
                    node.delivery.in_flight())
        yield gauge("channels", "Channel streams (P2 and P3 counted apart).",
                    node.hub.stream_count())
        yield gauge("pending_subscriptions", "Channels subscribed to that nothing was published "
                    "to yet (no stream is made for them).", node.hub.pending_count())
        yield gauge("registered_terminals", "Terminals in the registry.", len(node.registry))
        yield gauge("tickets_unattended", "Open tickets whose escalation found no one at any "
                    "level (store managers, region, tickets.escalate_role).",
                    len(node.tickets.unattended))
        yield gauge("tickets_waiting", "Open tickets that reached no terminal yet (no one on "
                    "duty when opened): the next staff login of the store gets them.",
                    sum(len(keys) for keys in node.tickets.waiting.values()))
        yield gauge("draining", "1 while the node drains.", 1 if node.draining else 0)
        yield gauge("uptime_seconds", "Seconds since the node started.",
                    time.time() - node.started)
        yield gauge("gc_frozen_objects", "Objects out of the garbage collector's sight "
                    "(frozen once started: tillwire serve).", gc.get_freeze_count())
        fam = GaugeMetricFamily("tillwire_gc_threshold",
                                "The garbage collector's threshold per generation (tillwire "
                                "serve spaces out full collections: generation 2).",
                                labels=[*BASE_LABELS, "generation"])
        for generation, value in enumerate(gc.get_threshold()):
            fam.add_metric([*w, str(generation)], value)
        yield fam


def make_registry(node) -> CollectorRegistry:
    """A registry of its own (not the global one): one per node, tests run several."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node))
    registry.register(_Labelled(ProcessCollector(namespace="tillwire", registry=None), node))
    return registry


def render(registry: CollectorRegistry, accept: str | None = None) -> tuple[bytes, str]:
    """(body, content type) of a scrape, in the format the ``Accept`` header asks
    for (Prometheus text by default, OpenMetrics when asked)."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type
