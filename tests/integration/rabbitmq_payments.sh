#!/usr/bin/env bash
# A "payments" participant written in shell with rabbitmqadmin, amqp-publish and jq, from docs/protocol.md ("Over
# RabbitMQ") alone: no project code on this side.
#   rabbitmq_payments.sh AMQP_URL MANAGEMENT_HOST MANAGEMENT_PORT USER PASSWORD COMMAND_TOPIC QUEUE STATE_DIR
# amqp-publish splits a -H "name: value" at its first colon, so the replies use the binding's other prefix,
# cloudEvents_ (docs/protocol.md: both are read). Charges above 500 are declined (reply type payment.declined). Every applied effect is appended to
# STATE_DIR/effects (one line per effect) so a test can check nothing was applied twice; STATE_DIR/dedup holds the
# recorded replies, keyed by "<saga>/<step>/<kind>" as the protocol asks. STATE_DIR/ready appears once the queue
# is bound: commands published from then on reach it.
set -euo pipefail
amqp=${1%/} host=$2 port=$3 user=$4 password=$5 topic=$6 queue=$7 state=$8
mkdir -p "$state"
touch "$state/dedup" "$state/effects"

admin() { rabbitmqadmin -H "$host" -P "$port" -u "$user" -p "$password" "$@"; }

# The topic exchange exactly as the protocol gives it, then a queue of our own bound to it.
admin declare exchange name="$topic" type=fanout durable=true \
  arguments="{\"alternate-exchange\": \"$topic.unrouted\"}" >/dev/null
admin declare queue name="$queue" durable=true arguments='{"x-queue-type": "quorum"}' >/dev/null
admin declare binding source="$topic" destination="$queue" >/dev/null
touch "$state/ready"

reply() {  # reply SAGA STEP ATTEMPT CAUSATION REPLY_TO OUTCOME TYPE DATA
  amqp-publish -u "$amqp" -e "$5" -r "$1" -p -C application/json \
    -H "cloudEvents_specversion: 1.0" -H "cloudEvents_id: $4/reply" -H "cloudEvents_source: bash-payments" \
    -H "cloudEvents_type: $7" -H "cloudEvents_subject: $1" -H "cloudEvents_time: $(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    -H "cloudEvents_sagastep: $2" -H "cloudEvents_sagaattempt: $3" -H "cloudEvents_sagakind: reply" \
    -H "cloudEvents_sagacausation: $4" -H "cloudEvents_sagaoutcome: $6" -H "cloudEvents_sagaschema: 1" -b "$8"
}

# ackmode=ack_requeue_false takes the messages off the queue as it reads them (see docs/protocol.md); a command
# read twice anyway (a redelivery by the engine) is harmless because of the dedup file.
while true; do
  batch=$(admin -f raw_json get queue="$queue" count=50 ackmode=ack_requeue_false)
  count=$(jq 'length' <<< "$batch")
  if [ "$count" = 0 ]; then sleep 0.2; continue; fi
  for ((i = 0; i < count; i++)); do
    message=$(jq -c ".[$i]" <<< "$batch")
    attribute() { jq -r --arg name "cloudEvents:$1" '.properties.headers[$name] // ""' <<< "$message"; }
    saga=$(attribute subject) step=$(attribute sagastep) kind=$(attribute sagakind)
    attempt=$(attribute sagaattempt) id=$(attribute id) type=$(attribute type) reply_to=$(attribute sagareplyto)
    value=$(jq -r '.payload' <<< "$message")
    dedup_key="$saga/$step/$kind"
    recorded=$(grep -F -m1 "$dedup_key"$'\t' "$state/dedup" || true)
    if [ -n "$recorded" ]; then
      IFS=$'\t' read -r _ outcome reply_type data <<< "$recorded"
    else
      amount=$(jq -r '.amount // 0' <<< "$value")
      if [ "$type" != "payment.charge" ]; then
        outcome=failure reply_type="$type.failed" data='{}'
      elif awk -v a="$amount" 'BEGIN { exit !(a > 500) }'; then
        outcome=failure reply_type=payment.declined data='{"reason":"over limit"}'
      else
        outcome=success reply_type=payment.charge.succeeded data="{\"payment_id\":\"pay-${saga:0:8}\"}"
        printf '%s\t%s\n' "$dedup_key" "$amount" >> "$state/effects"
      fi
      printf '%s\t%s\t%s\t%s\n' "$dedup_key" "$outcome" "$reply_type" "$data" >> "$state/dedup"
    fi
    reply "$saga" "$step" "$attempt" "$id" "$reply_to" "$outcome" "$reply_type" "$data"
  done
done
