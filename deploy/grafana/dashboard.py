#!/usr/bin/env python3
"""Writes cfq-relay.json, the Grafana dashboard of cfq-relay, next to this file.

Edit the panels here, not in the JSON. `--check` fails if the JSON is not what this writes
(CI runs it). Import the JSON in Grafana (Dashboards > New > Import) and pick a Prometheus
data source.
"""

import json
import pathlib
import sys

DS = {"type": "prometheus", "uid": "${datasource}"}
Q = 'queue=~"$queue"'
RETRIED = ', outcome=~"retried|undecodable"'
NOT_OK = ', result!="ok"'
panels = []
pid = [0]
y = [0]
x = [0]


def nid():
    pid[0] += 1
    return pid[0]


def row(title):
    panels.append(
        {
            "type": "row",
            "title": title,
            "id": nid(),
            "collapsed": False,
            "gridPos": {"h": 1, "w": 24, "x": 0, "y": y[0]},
            "panels": [],
        }
    )
    y[0] += 1


def ts(title, desc, targets, unit="short", w=8, h=8, stack=False, kind="timeseries", extra=None):
    p = {
        "type": kind,
        "title": title,
        "description": desc,
        "id": nid(),
        "datasource": DS,
        "gridPos": {"h": h, "w": w, "x": x[0], "y": y[0]},
        "targets": [
            {"datasource": DS, "refId": chr(65 + i), "expr": e, "legendFormat": l, "range": True}
            for i, (e, l) in enumerate(targets)
        ],
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }
    if kind == "timeseries":
        p["fieldConfig"]["defaults"]["custom"] = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 30 if stack else 10,
            "stacking": {"mode": "normal" if stack else "none", "group": "A"},
            "showPoints": "never",
        }
        p["fieldConfig"]["defaults"]["min"] = 0
    for k, v in (extra or {}).items():
        if k == "defaults":
            p["fieldConfig"]["defaults"].update(v)
        else:
            p[k] = v
    panels.append(p)
    x[0] += w
    if x[0] >= 24:
        x[0] = 0
        y[0] += h


def endrow(h=8):
    if x[0] != 0:
        x[0] = 0
        y[0] += h


def sel(extra=""):
    return "{" + Q + extra + "}"


row("Queue")
ts(
    "Backlog",
    "Unacknowledged messages in the queue, from the last pull. Every replica reports the same queue-wide figure: max, not sum. What KEDA scales on.",
    [(f"max by (queue) (cfq_relay_queue_backlog_messages{sel()})", "{{queue}}")],
)
ts(
    "Oldest message age",
    "Age of the oldest unacknowledged message at the last pull (0: unknown or empty queue).",
    [(f"max by (queue) (cfq_relay_queue_oldest_message_age_seconds{sel()})", "{{queue}}")],
    unit="s",
)
ts(
    "Backlog bytes",
    "Bytes of the unacknowledged messages, from the last pull.",
    [(f"max by (queue) (cfq_relay_queue_backlog_bytes{sel()})", "{{queue}}")],
    unit="bytes",
)
endrow()
row("Throughput and outcomes")
ts(
    "Throughput",
    "Messages pulled, and acks and retries accepted by the ack API, per second (all replicas).",
    [
        (
            f"sum by (queue) (rate(cfq_relay_messages_pulled_total{sel()}[$__rate_interval]))",
            "{{queue}} pulled",
        ),
        (
            f"sum by (queue) (rate(cfq_relay_acks_sent_total{sel()}[$__rate_interval]))",
            "{{queue}} acked",
        ),
        (
            f"sum by (queue) (rate(cfq_relay_retries_sent_total{sel()}[$__rate_interval]))",
            "{{queue}} retried",
        ),
    ],
    unit="ops",
)
ts(
    "Outcomes",
    "Messages handled per second, by outcome: acked (webhook 2xx), retried, dropped by policy, undecodable.",
    [
        (
            f"sum by (queue, outcome) (rate(cfq_relay_messages_delivered_total{sel()}[$__rate_interval]))",
            "{{queue}} {{outcome}}",
        )
    ],
    unit="ops",
    stack=True,
)
ts(
    "Webhook answers",
    "Webhook answers per second, by status class (timeout and error: no answer).",
    [
        (
            f"sum by (queue, status_class) (rate(cfq_relay_webhook_responses_total{sel()}[$__rate_interval]))",
            "{{queue}} {{status_class}}",
        )
    ],
    unit="reqps",
    stack=True,
)
ts(
    "Handed back",
    "Held messages handed back undelivered with a zero-delay retry, by reason (lease too short, shutdown or reload drain, breaker).",
    [
        (
            f"sum by (queue, reason) (rate(cfq_relay_messages_released_total{sel()}[$__rate_interval]))",
            "{{queue}} {{reason}}",
        )
    ],
    unit="ops",
)
ts(
    "Retry share",
    "Share of handled messages that were not acked (retried or undecodable).",
    [
        (
            f"sum by (queue) (rate(cfq_relay_messages_delivered_total{sel(RETRIED)}[$__rate_interval])) / clamp_min(sum by (queue) (rate(cfq_relay_messages_delivered_total{sel()}[$__rate_interval])), 1e-9)",
            "{{queue}}",
        )
    ],
    unit="percentunit",
    extra={"defaults": {"max": 1}},
)
ts(
    "Leases expired",
    "Acks or retries that could not reach Cloudflare before their lease ran out: those messages are redelivered. Should stay 0.",
    [
        (
            f"sum by (queue) (increase(cfq_relay_leases_expired_total{sel()}[$__rate_interval]))",
            "{{queue}}",
        )
    ],
)
endrow()
row("Latency")


def quant(metric, lbl):
    return [
        (
            f"histogram_quantile({q}, sum by (queue, le) (rate({metric}_bucket{sel()}[$__rate_interval])))",
            f"{lbl} p{round(q*100)}",
        )
        for q in (0.5, 0.9, 0.99)
    ]


ts(
    "Webhook latency",
    "Webhook request duration quantiles (all status classes).",
    quant("cfq_relay_webhook_request_duration_seconds", "{{queue}}"),
    unit="s",
)
ts(
    "Message age at delivery",
    "End-to-end age of a message when its webhook answered (now - publish time).",
    quant("cfq_relay_message_age_at_delivery_seconds", "{{queue}}"),
    unit="s",
)
ts(
    "Cloudflare API latency p99",
    "Pull and ack call duration, 99th percentile.",
    [
        (
            f"histogram_quantile(0.99, sum by (queue, op, le) (rate(cfq_relay_api_request_duration_seconds_bucket{sel()}[$__rate_interval])))",
            "{{queue}} {{op}}",
        )
    ],
    unit="s",
)
ts(
    "Messages per batch request",
    "Average messages a batch request carried (batch mode only: [consumers.webhook.batch]); webhook requests per message is its inverse.",
    [
        (
            f"sum by (queue) (rate(cfq_relay_batch_messages_sum{sel()}[$__rate_interval])) / sum by (queue) (rate(cfq_relay_batch_messages_count{sel()}[$__rate_interval]))",
            "{{queue}}",
        )
    ],
)
endrow()
row("Capacity and health")
ts(
    "Deliveries in flight",
    "Webhook deliveries in progress against the adaptive limit and the configured upper bound (concurrency), summed over replicas.",
    [
        (f"sum by (queue) (cfq_relay_deliveries_in_flight{sel()})", "{{queue}} in flight"),
        (f"sum by (queue) (cfq_relay_concurrency_limit{sel()})", "{{queue}} adaptive limit"),
        (f"sum by (queue) (cfq_relay_concurrency{sel()})", "{{queue}} concurrency (upper bound)"),
    ],
)
ts(
    "Webhook RTT baseline",
    "The webhook's unloaded round trip as the adaptive limit sees it; the limit shrinks when latency climbs well past it.",
    [(f"max by (queue) (cfq_relay_webhook_rtt_baseline_seconds{sel()})", "{{queue}}")],
    unit="s",
)
ts(
    "Utilisation",
    "Adaptive limit / concurrency. Near 100% with a growing backlog: raise concurrency or add replicas; low while the backlog grows: the webhook is the bottleneck.",
    [
        (
            f"sum by (queue) (cfq_relay_concurrency_limit{sel()}) / sum by (queue) (cfq_relay_concurrency{sel()})",
            "{{queue}}",
        )
    ],
    unit="percentunit",
    extra={"defaults": {"max": 1}},
)
ts(
    "Replicas",
    "Relay processes consuming each queue.",
    [(f"count by (queue) (cfq_relay_concurrency{sel()})", "{{queue}}")],
    extra={"defaults": {"decimals": 0}},
)
ts(
    "Circuit breaker",
    "Breaker of each webhook, worst replica: closed (delivering), open (no pulls), half-open (probing).",
    [(f"max by (queue) (cfq_relay_breaker_state{sel()})", "{{queue}}")],
    kind="state-timeline",
    extra={
        "defaults": {
            "mappings": [
                {
                    "type": "value",
                    "options": {
                        "0": {"text": "closed", "color": "green", "index": 0},
                        "1": {"text": "open", "color": "red", "index": 1},
                        "2": {"text": "half-open", "color": "orange", "index": 2},
                    },
                }
            ],
            "color": {"mode": "thresholds"},
            "thresholds": {
                "mode": "absolute",
                "steps": [
                    {"color": "green", "value": None},
                    {"color": "red", "value": 1},
                    {"color": "orange", "value": 2},
                ],
            },
        },
        "options": {
            "showValue": "never",
            "mergeValues": True,
            "rowHeight": 0.8,
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": False},
            "tooltip": {"mode": "single", "sort": "none"},
        },
    },
)
ts(
    "Cloudflare API errors",
    "Pull and ack calls that failed, per second, by result.",
    [
        (
            f"sum by (queue, op, result) (rate(cfq_relay_api_requests_total{sel(NOT_OK)}[$__rate_interval]))",
            "{{queue}} {{op}} {{result}}",
        )
    ],
    unit="reqps",
)
ts(
    "Since last successful pull",
    "Seconds since any replica last pulled successfully (the CfqRelayNoSuccessfulPull alert fires above 300 s).",
    [
        (
            f"time() - max by (queue) (cfq_relay_last_successful_pull_timestamp_seconds{sel()})",
            "{{queue}}",
        )
    ],
    unit="s",
)
endrow()

dash = {
    "annotations": {
        "list": [
            {
                "builtIn": 1,
                "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                "enable": True,
                "hide": True,
                "iconColor": "rgba(0, 211, 255, 1)",
                "name": "Annotations & Alerts",
                "type": "dashboard",
            }
        ]
    },
    "description": "cfq-relay: Cloudflare Queues (HTTP pull) to webhook. Backlog, throughput, outcomes, latency, capacity.",
    "editable": True,
    "graphTooltip": 1,
    "links": [],
    "liveNow": False,
    "panels": panels,
    "refresh": "30s",
    "schemaVersion": 39,
    "tags": ["cfq-relay", "cloudflare", "queues"],
    "templating": {
        "list": [
            {
                "name": "datasource",
                "label": "Data source",
                "type": "datasource",
                "query": "prometheus",
                "current": {},
                "hide": 0,
                "refresh": 1,
                "regex": "",
                "options": [],
            },
            {
                "name": "queue",
                "label": "Queue",
                "type": "query",
                "datasource": DS,
                "definition": "label_values(cfq_relay_queue_backlog_messages, queue)",
                "query": {
                    "query": "label_values(cfq_relay_queue_backlog_messages, queue)",
                    "refId": "queue",
                },
                "refresh": 2,
                "includeAll": True,
                "multi": True,
                "allValue": ".*",
                "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
                "sort": 1,
                "hide": 0,
                "options": [],
                "regex": "",
            },
        ]
    },
    "time": {"from": "now-6h", "to": "now"},
    "timepicker": {},
    "timezone": "",
    "title": "cfq-relay",
    "uid": "cfq-relay",
    "version": 1,
    "weekStart": "",
}
text = json.dumps(dash, indent=2, ensure_ascii=False) + "\n"
out = pathlib.Path(__file__).with_name("cfq-relay.json")
if sys.argv[1:] == ["--check"]:
    if out.read_text(encoding="utf-8") != text:
        sys.exit(f"{out} is out of date: run python3 {__file__}")
    print(f"{out.name}: up to date, {len(panels)} panels")
else:
    out.write_text(text, encoding="utf-8")
