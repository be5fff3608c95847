#!/usr/bin/env bash
# A "payments" participant written in shell with kcat, from docs/protocol.md alone: no project code on this side.
#   kcat_payments.sh BROKER COMMAND_TOPIC GROUP STATE_DIR
# Charges above 500 are declined (reply type payment.declined). Every applied effect is appended to
# STATE_DIR/effects (one line per effect) so a test can check nothing was applied twice; STATE_DIR/dedup holds the
# recorded replies, keyed by "<saga>/<step>/<kind>" as the protocol asks.
set -euo pipefail
broker=$1 topic=$2 group=$3 state=$4
mkdir -p "$state"
touch "$state/dedup" "$state/effects"

reply() {  # reply SAGA STEP ATTEMPT CAUSATION REPLY_TO OUTCOME TYPE DATA
  printf '%s' "$8" | kcat -b "$broker" -P -t "$5" -k "$1" \
    -H ce_specversion=1.0 -H "ce_id=$4/reply" -H ce_source=kcat-payments -H "ce_type=$7" -H "ce_subject=$1" \
    -H "ce_time=$(date -u +%Y-%m-%dT%H:%M:%SZ)" -H "ce_sagastep=$2" -H "ce_sagaattempt=$3" -H ce_sagakind=reply \
    -H "ce_sagacausation=$4" -H "ce_sagaoutcome=$6" -H ce_sagaschema=1 -H content-type=application/json
}

# -f: key, headers (name=value,...) and value, tab-separated, one message per line. Offsets are committed by kcat
# after the message is printed; a redelivery after a crash is harmless because of the dedup file.
kcat -b "$broker" -G "$group" -X auto.offset.reset=earliest -q -u -f '%k\t%h\t%s\n' "$topic" |
while IFS=$'\t' read -r key headers value; do
  declare -A h=()
  IFS=',' read -ra pairs <<< "$headers"
  for pair in "${pairs[@]}"; do h[${pair%%=*}]=${pair#*=}; done
  saga=${h[ce_subject]} step=${h[ce_sagastep]} kind=${h[ce_sagakind]} attempt=${h[ce_sagaattempt]}
  id=${h[ce_id]} type=${h[ce_type]} reply_to=${h[ce_sagareplyto]}
  dedup_key="$saga/$step/$kind"
  recorded=$(grep -F -m1 "$dedup_key"$'\t' "$state/dedup" || true)
  if [ -n "$recorded" ]; then
    IFS=$'\t' read -r _ outcome reply_type data <<< "$recorded"
  else
    amount=$(printf '%s' "$value" | sed -n 's/.*"amount":\([0-9.]*\).*/\1/p')
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
  unset h
done
