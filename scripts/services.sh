#!/usr/bin/env bash
# Start/stop the REAL PostgreSQL, Apache Kafka and RabbitMQ servers that the test suite uses, on 127.0.0.1,
# without Docker and without Kafka's download site (the broker comes from Maven Central, RabbitMQ from Debian).
#
#   scripts/services.sh start  [postgres|kafka|rabbitmq|prometheus|all]   start what is not running yet, wait until ready
#   scripts/services.sh stop   [postgres|kafka|rabbitmq|prometheus|all]   stop only what THIS script started
#   scripts/services.sh status [postgres|kafka|rabbitmq|prometheus|all]
#   scripts/services.sh env                           eval "$(scripts/services.sh env)"
#   scripts/services.sh stop-one NAME  | pause NAME   stop one service, keep its data (outage tests)
#   scripts/services.sh start-one NAME | resume NAME  start it again on the same data
#   scripts/services.sh close-connections rabbitmq     close every client connection from the server side
#
# Environment:
#   SAGAS_SERVICES_DIR    state dir (default <repo>/.services): data, logs, pid files, markers
#   (Every default port is below Linux's ephemeral range, 32768-60999: the outage tests restart servers, and a
#   client socket that happened to take a listener's port made the restart fail with EADDRINUSE.)
#   SAGAS_PG_PORT         PostgreSQL port (default 25432)
#   SAGAS_KAFKA_PORT / SAGAS_KAFKA_CONTROLLER_PORT   (default 19092 / 19093)
#   SAGAS_RABBITMQ_PORT / SAGAS_RABBITMQ_MANAGEMENT_PORT / SAGAS_RABBITMQ_DIST_PORT / SAGAS_RABBITMQ_EPMD_PORT
#                         (default 21672 / 21674 / 21673 / 21675: none of them RabbitMQ's or Erlang's defaults;
#                         rabbitmqctl's own distribution ports are 45680-45690, not RabbitMQ's 35672-35682)
#   SAGAS_PROMETHEUS_PORT   Prometheus's port (default 29090; it scrapes the targets tests write into
#                         $SAGAS_TEST_PROMETHEUS_TARGETS, every second, and loads docs/prometheus/alerts.yml)
#   SAGAS_TEST_PG_URL / SAGAS_TEST_KAFKA_URL / SAGAS_TEST_AMQP_URL   if set to something other than the default
#                         URL, that server is external: this script neither starts nor stops it.
#   SAGAS_TEST_AMQP_MANAGEMENT_URL   RabbitMQ's management API (rabbitmqadmin), passed through by `env`
#   SAGAS_PG_START_TIMEOUT / SAGAS_KAFKA_START_TIMEOUT / SAGAS_RABBITMQ_START_TIMEOUT   readiness deadlines in s
#                         (60 / 120 / 120)
#   SAGAS_KAFKA_STOP_TIMEOUT   seconds to wait after SIGTERM before SIGKILL (20)
# See docs/services.md.
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE_DIR="${SAGAS_SERVICES_DIR:-$REPO_DIR/.services}"
KAFKA_HOME="$REPO_DIR/services/kafka"

PG_PORT="${SAGAS_PG_PORT:-25432}"
KAFKA_PORT="${SAGAS_KAFKA_PORT:-19092}"
KAFKA_CONTROLLER_PORT="${SAGAS_KAFKA_CONTROLLER_PORT:-19093}"
PG_START_TIMEOUT="${SAGAS_PG_START_TIMEOUT:-60}"
KAFKA_START_TIMEOUT="${SAGAS_KAFKA_START_TIMEOUT:-120}"
KAFKA_STOP_TIMEOUT="${SAGAS_KAFKA_STOP_TIMEOUT:-20}"
RABBITMQ_PORT="${SAGAS_RABBITMQ_PORT:-21672}"
RABBITMQ_MANAGEMENT_PORT="${SAGAS_RABBITMQ_MANAGEMENT_PORT:-21674}"
RABBITMQ_DIST_PORT_="${SAGAS_RABBITMQ_DIST_PORT:-21673}"
RABBITMQ_EPMD_PORT="${SAGAS_RABBITMQ_EPMD_PORT:-21675}"
RABBITMQ_START_TIMEOUT="${SAGAS_RABBITMQ_START_TIMEOUT:-120}"
PROMETHEUS_PORT="${SAGAS_PROMETHEUS_PORT:-29090}"

DEFAULT_PG_URL="postgresql+asyncpg://sagas:sagas@127.0.0.1:${PG_PORT}/sagas"
DEFAULT_KAFKA_URL="kafka://127.0.0.1:${KAFKA_PORT}"
DEFAULT_AMQP_URL="amqp://sagas:sagas@127.0.0.1:${RABBITMQ_PORT}/"
DEFAULT_PROMETHEUS_URL="http://127.0.0.1:${PROMETHEUS_PORT}"
DEFAULT_AMQP_MANAGEMENT_URL="http://sagas:sagas@127.0.0.1:${RABBITMQ_MANAGEMENT_PORT}/"

# PostgreSQL layout: everything below $STATE_DIR/postgres is owned by the server's OS user.
PG_DIR="$STATE_DIR/postgres"
PG_DATA="$PG_DIR/data"
PG_SOCK="$PG_DIR/run"          # own socket dir: /var/run/postgresql may not exist without the Debian service
PG_LOG="$STATE_DIR/postgres.log"

KAFKA_STATE="$STATE_DIR/kafka"
KAFKA_DATA="$KAFKA_STATE/data"
KAFKA_CONF="$KAFKA_STATE/server.properties"
KAFKA_CLUSTER_ID_FILE="$KAFKA_STATE/cluster-id"
KAFKA_LOG="$STATE_DIR/kafka.log"
KAFKA_PID="$STATE_DIR/kafka.pid"
KAFKA_LIB="$KAFKA_HOME/lib"
KAFKA_CDS_PENDING="$KAFKA_STATE/cds-pending"   # holds the path of an archive being dumped

log() { printf '[services] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
# Last 40 lines of a log on stderr; never fails (it runs on error paths under `set -e`).
show_tail() { log "--- last 40 lines of $1 ---"; tail -n 40 "$1" >&2 2>/dev/null || true; }
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
elapsed() { local ms=$(( $(now_ms) - $1 )); printf '%d.%03ds' $((ms / 1000)) $((ms % 1000)); }

# True when something accepts TCP connections on 127.0.0.1:$1.
port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

marker() { echo "$STATE_DIR/started-$1"; }
started_by_us() { [[ -f "$(marker "$1")" ]]; }

# A service is external when its URL variable was set beforehand to something else than ours.
is_external() {
  case "$1" in
    postgres) [[ -n "${SAGAS_TEST_PG_URL:-}" && "${SAGAS_TEST_PG_URL}" != "$DEFAULT_PG_URL" ]] ;;
    kafka) [[ -n "${SAGAS_TEST_KAFKA_URL:-}" && "${SAGAS_TEST_KAFKA_URL}" != "$DEFAULT_KAFKA_URL" ]] ;;
    rabbitmq) [[ -n "${SAGAS_TEST_AMQP_URL:-}" && "${SAGAS_TEST_AMQP_URL}" != "$DEFAULT_AMQP_URL" ]] ;;
    prometheus) [[ -n "${SAGAS_TEST_PROMETHEUS_URL:-}" && "${SAGAS_TEST_PROMETHEUS_URL}" != "$DEFAULT_PROMETHEUS_URL" ]] ;;
  esac
}

# True (and says why) when `start NAME` has nothing to do: the server is external, already ours, or its port taken.
# Args: name, port, URL variable.
nothing_to_start() {
  if is_external "$1"; then log "$1: $3 is set to an external server; not starting"; return 0; fi
  if started_by_us "$1" && "$(svc "$1")_running"; then log "$1: already running (ours) on 127.0.0.1:$2"; return 0; fi
  if port_open "$2"; then log "$1: port $2 already in use, assuming a server is there; not starting"; return 0; fi
  return 1
}

# One status line. Args: name, port, URL variable, pid of ours.
status_line() {
  local who="not started by this script"
  started_by_us "$1" && who="started by this script, pid $4"
  if is_external "$1"; then echo "$1: external: ${!3}"
  elif port_open "$2"; then echo "$1: running on 127.0.0.1:$2 ($who)"
  else echo "$1: stopped"; fi
}

APT_UPDATED=0
apt_install() {
  command -v apt-get >/dev/null || die "need to install $*, but apt-get is not available"
  [[ $EUID -eq 0 ]] || die "need to install $* (apt-get); run as root or install it yourself"
  # The lock timeout: another apt-get (another checkout's script, a developer) may be running at the same time.
  if [[ $APT_UPDATED -eq 0 ]]; then apt-get -o DPkg::Lock::Timeout=600 update -qq; APT_UPDATED=1; fi
  log "installing $* (apt)"
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq "$@" >/dev/null
}

# ----------------------------------------------------------------------------------------------
# PostgreSQL
# ----------------------------------------------------------------------------------------------
PG_BIN=""
pg_find_bin() {
  # Newest installed server version; Debian puts binaries outside PATH.
  PG_BIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)"
  [[ -n "$PG_BIN" && -x "$PG_BIN/postgres" ]]
}

# postgres refuses to run as root, so as root we run its tools as the `postgres` OS user.
# `cd /` so the server user never needs access to the caller's working directory.
as_pg() {
  if [[ $EUID -eq 0 ]]; then (cd / && runuser -u postgres -- "$@"); else (cd / && "$@"); fi
}

pg_install() {
  pg_find_bin && return 0
  # We initdb our own cluster; tell postgresql-common not to create (and start) the default one.
  mkdir -p /etc/postgresql-common/createcluster.d
  echo "create_main_cluster = false" >/etc/postgresql-common/createcluster.d/sagas-no-main.conf
  apt_install postgresql
  pg_find_bin || die "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin after install"
}

pg_running() { [[ -f "$PG_DATA/postmaster.pid" ]] && as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1; }

pg_initdb() {
  [[ -f "$PG_DATA/PG_VERSION" ]] && return 0
  log "postgres: initdb $PG_DATA (first start)"
  mkdir -p "$PG_DIR"
  if [[ $EUID -eq 0 ]]; then
    chown postgres:postgres "$PG_DIR"
    as_pg test -x "$PG_DIR" || die "user postgres cannot reach $PG_DIR: pick a SAGAS_SERVICES_DIR whose parents are world-executable"
  fi
  chmod 700 "$PG_DIR"
  # trust on the private unix socket (admin bootstrap below), passwords (md5) on 127.0.0.1.
  as_pg "$PG_BIN/initdb" -D "$PG_DATA" -U postgres -E UTF8 --locale=C \
    --auth-local=trust --auth-host=md5 >"$STATE_DIR/initdb.log" 2>&1 \
    || { show_tail "$STATE_DIR/initdb.log"; die "initdb failed"; }
  # Defaults on purpose (fsync/synchronous_commit stay on: benchmarks must be honest);
  # only more connections for parallel tests. The port and socket dir are given at start time.
  as_pg tee -a "$PG_DATA/postgresql.conf" >/dev/null <<EOF

# --- added by scripts/services.sh ---
listen_addresses = '127.0.0.1'
max_connections = 200
shared_buffers = 128MB
EOF
}

pg_psql_admin() { as_pg "$PG_BIN/psql" -h "$PG_SOCK" -p "$PG_PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -qtA "$@"; }

pg_bootstrap() {
  # Idempotent: role sagas/sagas (CREATEDB so tests may make scratch databases) and database sagas.
  pg_psql_admin -c "DO \$\$BEGIN
      IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'sagas') THEN
        CREATE ROLE sagas LOGIN CREATEDB PASSWORD 'sagas';
      END IF; END\$\$;" >/dev/null
  if [[ "$(pg_psql_admin -c "SELECT 1 FROM pg_database WHERE datname = 'sagas'")" != "1" ]]; then
    pg_psql_admin -c "CREATE DATABASE sagas OWNER sagas" >/dev/null
  fi
}

pg_start() {
  if is_external postgres; then log "postgres: SAGAS_TEST_PG_URL is set to an external server; not starting"; return 0; fi
  if started_by_us postgres && pg_find_bin && pg_running; then log "postgres: already running (ours) on 127.0.0.1:$PG_PORT"; return 0; fi
  if port_open "$PG_PORT"; then log "postgres: port $PG_PORT already in use, assuming a server is there; not starting"; return 0; fi
  local t0; t0=$(now_ms)
  pg_install
  pg_initdb
  mkdir -p "$PG_SOCK"; touch "$PG_LOG"
  [[ $EUID -eq 0 ]] && chown postgres:postgres "$PG_SOCK" "$PG_LOG"
  log "postgres: starting on 127.0.0.1:$PG_PORT (data $PG_DATA)"
  if ! as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t "$PG_START_TIMEOUT" \
      -o "-p $PG_PORT -k $PG_SOCK" start >/dev/null 9>&-; then   # 9>&-: the server must not inherit our lock fd
    show_tail "$PG_LOG"; die "postgres did not start (log: $PG_LOG)"
  fi
  touch "$(marker postgres)"
  # pg_ctl -w already waited for the socket; check TCP too, then create role/db and log in as sagas.
  local deadline=$(( $(date +%s) + PG_START_TIMEOUT ))
  until "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"; do
    (( $(date +%s) < deadline )) || { show_tail "$PG_LOG"; die "postgres not ready on 127.0.0.1:$PG_PORT"; }
    sleep 0.2
  done
  pg_bootstrap
  PGCONNECT_TIMEOUT=5 "$PG_BIN/psql" "postgresql://sagas:sagas@127.0.0.1:$PG_PORT/sagas" -qtAc 'select 1' >/dev/null \
    || { show_tail "$PG_LOG"; die "cannot log in as sagas on 127.0.0.1:$PG_PORT"; }
  log "postgres: ready in $(elapsed "$t0") -> postgresql://sagas:sagas@127.0.0.1:$PG_PORT/sagas"
}

pg_stop() {
  pg_find_bin || die "no PostgreSQL binaries found"
  if pg_running; then
    local t0; t0=$(now_ms)
    as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w -t 60 stop >/dev/null
    log "postgres: stopped in $(elapsed "$t0")"
  else
    log "postgres: was not running"
  fi
  rm -f "$(marker postgres)"
}

pg_status() {
  local who="not started by this script"
  started_by_us postgres && who="started by this script"
  is_external postgres && who="external: $SAGAS_TEST_PG_URL"
  if is_external postgres; then echo "postgres: $who"
  elif port_open "$PG_PORT"; then echo "postgres: running on 127.0.0.1:$PG_PORT ($who)"
  else echo "postgres: stopped"; fi
}

# ----------------------------------------------------------------------------------------------
# Kafka (single KRaft node, broker+controller in one JVM; jars from Maven Central)
# ----------------------------------------------------------------------------------------------
JAVA="${JAVA_HOME:+$JAVA_HOME/bin/}java"

# Alive and not a zombie (a child of this shell that exited stays a zombie until reaped).
proc_alive() { local st; st="$(ps -o stat= -p "$1" 2>/dev/null)" && [[ -n "$st" && "$st" != Z* ]]; }

kafka_pid() { [[ -f "$KAFKA_PID" ]] && cat "$KAFKA_PID"; }
# The pid file is only trusted if that pid still is our broker (pids get reused).
kafka_running() {
  local pid; pid="$(kafka_pid)" || return 1
  [[ -n "$pid" ]] && proc_alive "$pid" && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'kafka\.Kafka'
}

kafka_install() {
  command -v "$JAVA" >/dev/null || apt_install openjdk-17-jre-headless
  # lib/ is rebuilt when pom.xml changes, so jars of two Kafka versions never mix on the classpath.
  local stamp; stamp="$(sha256sum "$KAFKA_HOME/pom.xml" | cut -d' ' -f1)"
  if [[ ! -f "$KAFKA_LIB/.pom.sha256" || "$(cat "$KAFKA_LIB/.pom.sha256")" != "$stamp" ]] \
      || ! compgen -G "$KAFKA_LIB/kafka_2.13-*.jar" >/dev/null; then
    command -v mvn >/dev/null || apt_install maven
    log "kafka: fetching broker jars from Maven Central into $KAFKA_LIB"
    local t0; t0=$(now_ms)
    rm -rf "$KAFKA_LIB"
    (cd "$KAFKA_HOME" && mvn -q -B -Dstyle.color=never \
        dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory=lib) >"$STATE_DIR/mvn.log" 2>&1 \
      || { show_tail "$STATE_DIR/mvn.log"; die "mvn dependency:copy-dependencies failed (log: $STATE_DIR/mvn.log)"; }
    echo "$stamp" >"$KAFKA_LIB/.pom.sha256"
    log "kafka: $(find "$KAFKA_LIB" -name '*.jar' | wc -l) jars in $(elapsed "$t0")"
  fi
}

kafka_configure() {
  mkdir -p "$KAFKA_DATA"
  # Rendered on every start so port overrides and template edits apply; data stays put.
  sed -e "s#@KAFKA_PORT@#$KAFKA_PORT#g" \
      -e "s#@KAFKA_CONTROLLER_PORT@#$KAFKA_CONTROLLER_PORT#g" \
      -e "s#@KAFKA_DATA_DIR@#$KAFKA_DATA#g" \
      "$KAFKA_HOME/server.properties.template" >"$KAFKA_CONF"
  if [[ ! -s "$KAFKA_CLUSTER_ID_FILE" ]]; then
    java_tool random-uuid >"$KAFKA_CLUSTER_ID_FILE.tmp" || die "StorageTool random-uuid failed"
    mv "$KAFKA_CLUSTER_ID_FILE.tmp" "$KAFKA_CLUSTER_ID_FILE"
  fi
  # Formatting costs a JVM start (~1-2 s); only needed the first time.
  if [[ ! -f "$KAFKA_DATA/meta.properties" ]]; then
    log "kafka: formatting $KAFKA_DATA (cluster id $(cat "$KAFKA_CLUSTER_ID_FILE"))"
    local t0; t0=$(now_ms)
    java_tool format -t "$(cat "$KAFKA_CLUSTER_ID_FILE")" -c "$KAFKA_CONF" --ignore-formatted \
      >"$STATE_DIR/kafka-format.log" 2>&1 \
      || { show_tail "$STATE_DIR/kafka-format.log"; die "kafka storage format failed"; }
    log "kafka: formatted in $(elapsed "$t0")"
  fi
}

java_tool() {
  "$JAVA" -Xmx256m -Dlog4j2.configurationFile="$KAFKA_HOME/log4j2.properties" \
    -cp "$KAFKA_LIB/*" kafka.tools.StorageTool "$@"
}

# AppCDS: the broker's start is CPU-bound (JIT + loading ~thousands of Kafka/Scala classes); on
# 2 cores a class-data-sharing archive roughly halves it (measured ~19 s -> ~9.5 s under load).
# The first run records the archive when the JVM exits (i.e. on `stop`); later runs map it.
# Keyed by the jar set and the JDK: a stale archive would be ignored silently by the JVM.
# Startup only: steady-state performance is unaffected.
KAFKA_CDS_FLAGS=()
kafka_cds_setup() {
  local key archive
  key="$(cat "$KAFKA_LIB/.pom.sha256") $("$JAVA" -version 2>&1 | head -n1)"
  archive="$KAFKA_STATE/cds-$(echo "$key" | sha256sum | cut -c1-12).jsa"
  if [[ -s "$archive" ]]; then
    KAFKA_CDS_FLAGS=(-XX:SharedArchiveFile="$archive" '-Xlog:cds*=off')
  else
    rm -f "$KAFKA_STATE"/cds-*.jsa "$KAFKA_STATE"/cds-*.jsa.tmp
    KAFKA_CDS_FLAGS=(-XX:ArchiveClassesAtExit="$archive.tmp" '-Xlog:cds*=off')
    echo "$archive" >"$KAFKA_CDS_PENDING"
  fi
}

# Called after the broker exited: keep the archive only if the JVM finished writing it.
kafka_cds_finish() {
  local clean="$1" archive
  [[ -f "$KAFKA_CDS_PENDING" ]] || return 0
  archive="$(cat "$KAFKA_CDS_PENDING")"
  if [[ "$clean" == 1 && -s "$archive.tmp" ]]; then mv -f "$archive.tmp" "$archive"; else rm -f "$archive.tmp"; fi
  rm -f "$KAFKA_CDS_PENDING"
}

kafka_ready() {
  grep -q 'Kafka Server started' "$KAFKA_LOG" 2>/dev/null \
    && kcat -b "127.0.0.1:$KAFKA_PORT" -L -m 3 2>/dev/null | grep -q "127.0.0.1:$KAFKA_PORT"
}

kafka_start() {
  # kcat: readiness probe here, and an end-to-end test shells out to it (even with an external broker).
  command -v kcat >/dev/null || apt_install kcat
  if is_external kafka; then log "kafka: SAGAS_TEST_KAFKA_URL is set to an external broker; not starting"; return 0; fi
  if started_by_us kafka && kafka_running; then log "kafka: already running (ours) on 127.0.0.1:$KAFKA_PORT"; return 0; fi
  if port_open "$KAFKA_PORT"; then log "kafka: port $KAFKA_PORT already in use, assuming a broker is there; not starting"; return 0; fi
  local t0; t0=$(now_ms)
  kafka_install
  kafka_configure
  kafka_cds_finish 0   # a pending dump from a run that was never stopped by us is unusable
  kafka_cds_setup
  [[ -f "$KAFKA_LOG" ]] && mv -f "$KAFKA_LOG" "$KAFKA_LOG.1"   # one log per run, the previous one kept
  log "kafka: starting on 127.0.0.1:$KAFKA_PORT (controller :$KAFKA_CONTROLLER_PORT, data $KAFKA_DATA)"
  # Heap 256-512 MB instead of Kafka's 1 GB default; G1 settings as in kafka-run-class.sh.
  # setsid: own session, so a Ctrl-C aimed at the caller (e.g. pytest) does not kill the broker.
  setsid nohup "$JAVA" -Xms256m -Xmx512m -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent -Djava.awt.headless=true \
    "${KAFKA_CDS_FLAGS[@]}" \
    -Dlog4j2.configurationFile="$KAFKA_HOME/log4j2.properties" \
    -cp "$KAFKA_LIB/*" kafka.Kafka "$KAFKA_CONF" </dev/null >"$KAFKA_LOG" 2>&1 9>&- &
  local pid=$!
  echo "$pid" >"$KAFKA_PID"
  touch "$(marker kafka)"
  local deadline=$(( $(date +%s) + KAFKA_START_TIMEOUT ))
  until kafka_ready; do
    # proc_alive, not kafka_running: right after the fork, /proc/PID/cmdline is still bash's, not java's.
    if ! proc_alive "$pid"; then show_tail "$KAFKA_LOG"; rm -f "$(marker kafka)" "$KAFKA_PID"; die "kafka exited during startup (log: $KAFKA_LOG)"; fi
    if (( $(date +%s) >= deadline )); then
      show_tail "$KAFKA_LOG"; kafka_stop; die "kafka not ready after ${KAFKA_START_TIMEOUT}s (log: $KAFKA_LOG)"
    fi
    sleep 0.25
  done
  # CPU time and load are printed because on a busy 2-core box wall time mostly measures the neighbours.
  local cpu_ms; cpu_ms=$(awk -v hz="$(getconf CLK_TCK)" '{ print int(($14 + $15) * 1000 / hz) }' "/proc/$(kafka_pid)/stat" 2>/dev/null || echo 0)
  log "kafka: ready in $(elapsed "$t0") (JVM cpu $((cpu_ms / 1000)).$(printf %03d $((cpu_ms % 1000)))s, load $(cut -d' ' -f1 /proc/loadavg)) -> kafka://127.0.0.1:$KAFKA_PORT"
}

kafka_stop() {
  if kafka_running; then
    local pid t0 deadline timeout="$KAFKA_STOP_TIMEOUT" clean=1; pid="$(kafka_pid)"; t0=$(now_ms)
    # Writing the CDS archive at exit takes ~10 s more, once: allow for it.
    [[ -f "$KAFKA_CDS_PENDING" ]] && { timeout=$(( timeout + 60 )); log "kafka: stopping (first stop also writes the CDS archive)"; }
    kill -TERM "$pid"   # graceful: controlled shutdown, flushes and closes the logs cleanly
    deadline=$(( $(date +%s) + timeout ))
    while proc_alive "$pid" && (( $(date +%s) < deadline )); do sleep 0.2; done
    if proc_alive "$pid"; then
      log "kafka: still alive after ${timeout}s, sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      clean=0
      while proc_alive "$pid"; do sleep 0.1; done
    fi
    kafka_cds_finish "$clean"
    log "kafka: stopped in $(elapsed "$t0")"
  else
    kafka_cds_finish 0
    log "kafka: was not running"
  fi
  rm -f "$KAFKA_PID" "$(marker kafka)"
}

kafka_status() {
  local who="not started by this script"
  started_by_us kafka && who="started by this script, pid $(kafka_pid || echo '?')"
  is_external kafka && who="external: $SAGAS_TEST_KAFKA_URL"
  if is_external kafka; then echo "kafka: $who"
  elif port_open "$KAFKA_PORT"; then echo "kafka: running on 127.0.0.1:$KAFKA_PORT ($who)"
  else echo "kafka: stopped"; fi
}

# ----------------------------------------------------------------------------------------------
# RabbitMQ (Debian's rabbitmq-server, as a node of its own: never the system service)
# ----------------------------------------------------------------------------------------------
# Every path, port, the node name and the Erlang cookie are ours, set through RABBITMQ_* variables, so the
# node neither reads /etc/rabbitmq nor /var/lib/rabbitmq, nor meets a system node on epmd's default port.
RABBITMQ_STATE="$STATE_DIR/rabbitmq"
RABBITMQ_LOG="$STATE_DIR/rabbitmq.log"
RABBITMQ_NODE="sagas-test@localhost"
RABBITMQ_SBIN="/usr/lib/rabbitmq/bin"

rabbitmq_env() {
  export HOME="$RABBITMQ_STATE"   # the Erlang cookie is $HOME/.erlang.cookie, for the server and rabbitmqctl
  export RABBITMQ_NODENAME="$RABBITMQ_NODE"   # the AMQP listener is set in rabbitmq.conf (both would clash)
  export RABBITMQ_CTL_DIST_PORT_MIN=45680 RABBITMQ_CTL_DIST_PORT_MAX=45690
  export RABBITMQ_DIST_PORT="$RABBITMQ_DIST_PORT_" ERL_EPMD_PORT="$RABBITMQ_EPMD_PORT" ERL_EPMD_ADDRESS=127.0.0.1
  export RABBITMQ_CONFIG_FILE="$RABBITMQ_STATE/rabbitmq.conf" RABBITMQ_ENABLED_PLUGINS_FILE="$RABBITMQ_STATE/enabled_plugins"
  export RABBITMQ_CONF_ENV_FILE="$RABBITMQ_STATE/rabbitmq-env.conf" RABBITMQ_ADVANCED_CONFIG_FILE="$RABBITMQ_STATE/advanced.config"
  export RABBITMQ_MNESIA_BASE="$RABBITMQ_STATE/mnesia" RABBITMQ_LOG_BASE="$RABBITMQ_STATE/log"
  export RABBITMQ_PID_FILE="$RABBITMQ_STATE/rabbitmq.pid" RABBITMQ_LOGS="$RABBITMQ_STATE/log/node.log"
  export ERL_CRASH_DUMP="$RABBITMQ_STATE/erl_crash.dump"
  # Erlang distribution listens on every interface unless told otherwise: loopback only, like the rest.
  export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
}

rabbitmqctl_() { (rabbitmq_env; cd / && "$RABBITMQ_SBIN/rabbitmqctl" -n "$RABBITMQ_NODE" "$@"); }

rabbitmq_pid() { [[ -f "$RABBITMQ_STATE/rabbitmq.pid" ]] && cat "$RABBITMQ_STATE/rabbitmq.pid"; }
# Our node's pid file names a live beam whose home is our state dir (pids get reused).
rabbitmq_running() {
  local pid; pid="$(rabbitmq_pid)" || return 1
  [[ -n "$pid" ]] && proc_alive "$pid" && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "-home $RABBITMQ_STATE "
}

rabbitmq_install() {
  [[ -x "$RABBITMQ_SBIN/rabbitmq-server" ]] || apt_install rabbitmq-server
  # amqp-tools and jq: an end-to-end test's participant is a shell script around rabbitmqadmin (in
  # rabbitmq-server), amqp-publish and jq.
  command -v amqp-publish >/dev/null || apt_install amqp-tools
  command -v jq >/dev/null || apt_install jq
  [[ -x "$RABBITMQ_SBIN/rabbitmq-server" ]] || die "rabbitmq-server not found in $RABBITMQ_SBIN after install"
}

rabbitmq_configure() {
  mkdir -p "$RABBITMQ_STATE/log" "$RABBITMQ_STATE/mnesia"
  if [[ ! -s "$RABBITMQ_STATE/.erlang.cookie" ]]; then
    (umask 077; head -c 32 /dev/urandom | sha256sum | cut -c1-40 >"$RABBITMQ_STATE/.erlang.cookie")
  fi
  chmod 400 "$RABBITMQ_STATE/.erlang.cookie"
  : >"$RABBITMQ_STATE/rabbitmq-env.conf"
  # The consistent-hash exchange keeps one saga's messages in one partition queue (docs/architecture.md);
  # management gives rabbitmqadmin and the HTTP API, on 127.0.0.1 only.
  echo '[rabbitmq_consistent_hash_exchange,rabbitmq_management].' >"$RABBITMQ_STATE/enabled_plugins"
  # Rendered on every start so port overrides apply; the user is created on the first boot of an empty node.
  cat >"$RABBITMQ_STATE/rabbitmq.conf" <<EOF
listeners.tcp.default = 127.0.0.1:$RABBITMQ_PORT
management.tcp.ip = 127.0.0.1
management.tcp.port = $RABBITMQ_MANAGEMENT_PORT
default_user = sagas
default_pass = sagas
default_vhost = /
loopback_users = none
log.console = false
log.file.level = info
disk_free_limit.absolute = 200MB
EOF
}

rabbitmq_start() {
  if nothing_to_start rabbitmq "$RABBITMQ_PORT" SAGAS_TEST_AMQP_URL; then return 0; fi
  local t0; t0=$(now_ms)
  rabbitmq_install
  rabbitmq_configure
  [[ -f "$RABBITMQ_LOG" ]] && mv -f "$RABBITMQ_LOG" "$RABBITMQ_LOG.1"
  log "rabbitmq: starting node $RABBITMQ_NODE on 127.0.0.1:$RABBITMQ_PORT (management :$RABBITMQ_MANAGEMENT_PORT, dist :$RABBITMQ_DIST_PORT_, epmd :$RABBITMQ_EPMD_PORT)"
  # setsid: own session, so a Ctrl-C aimed at the caller does not stop the node; 9>&-: it must not hold our lock.
  (rabbitmq_env; cd "$RABBITMQ_STATE" && exec setsid nohup "$RABBITMQ_SBIN/rabbitmq-server" \
     </dev/null >"$RABBITMQ_LOG" 2>&1 9>&-) &
  local launcher=$!
  touch "$(marker rabbitmq)"
  local deadline=$(( $(date +%s) + RABBITMQ_START_TIMEOUT ))
  until rabbitmq_running && rabbitmqctl_ -q await_startup --timeout 5 >/dev/null 2>&1 && port_open "$RABBITMQ_PORT"; do
    if ! proc_alive "$launcher" && ! rabbitmq_running; then
      show_tail "$RABBITMQ_LOG"; show_tail "$RABBITMQ_STATE/log/node.log"; rm -f "$(marker rabbitmq)"
      die "rabbitmq exited during startup (logs: $RABBITMQ_LOG, $RABBITMQ_STATE/log/)"
    fi
    if (( $(date +%s) >= deadline )); then
      show_tail "$RABBITMQ_STATE/log/node.log"; rabbitmq_stop
      die "rabbitmq not ready after ${RABBITMQ_START_TIMEOUT}s (logs: $RABBITMQ_STATE/log/)"
    fi
    sleep 0.5
  done
  local cpu_ms; cpu_ms=$(awk -v hz="$(getconf CLK_TCK)" '{ print int(($14 + $15) * 1000 / hz) }' "/proc/$(rabbitmq_pid)/stat" 2>/dev/null || echo 0)
  log "rabbitmq: ready in $(elapsed "$t0") (beam cpu $((cpu_ms / 1000)).$(printf %03d $((cpu_ms % 1000)))s, load $(cut -d' ' -f1 /proc/loadavg)) -> $DEFAULT_AMQP_URL"
}

rabbitmq_stop() {
  if rabbitmq_running; then
    local pid t0; pid="$(rabbitmq_pid)"; t0=$(now_ms)
    # `shutdown` waits until the node has stopped; SIGKILL only if it will not.
    rabbitmqctl_ -q shutdown --timeout 30 >/dev/null 2>&1 || kill -TERM "$pid" 2>/dev/null || true
    local deadline=$(( $(date +%s) + 30 ))
    while proc_alive "$pid" && (( $(date +%s) < deadline )); do sleep 0.2; done
    if proc_alive "$pid"; then log "rabbitmq: still alive after 30s, sending SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; fi
    # Our own epmd (on our port) goes too: it was started by our node and nobody else uses that port.
    (rabbitmq_env; epmd -port "$RABBITMQ_EPMD_PORT" -kill >/dev/null 2>&1 || true)
    log "rabbitmq: stopped in $(elapsed "$t0")"
  else
    log "rabbitmq: was not running"
  fi
  rm -f "$(marker rabbitmq)"
}

rabbitmq_status() {
  status_line rabbitmq "$RABBITMQ_PORT" SAGAS_TEST_AMQP_URL "$(rabbitmq_pid || echo '?')"
}

# Close every client connection from the server side (outage tests); the node stays up.
rabbitmq_close_connections() {
  rabbitmqctl_ -q close_all_connections "${1:-closed by scripts/services.sh}" >/dev/null
}

# ----------------------------------------------------------------------------------------------
# Prometheus (Debian's prometheus, never the system service): scrapes what tests list in its targets dir
# ----------------------------------------------------------------------------------------------
PROMETHEUS_STATE="$STATE_DIR/prometheus"
PROMETHEUS_TARGETS="$PROMETHEUS_STATE/targets"
PROMETHEUS_LOG="$STATE_DIR/prometheus.log"
PROMETHEUS_PID="$STATE_DIR/prometheus.pid"
PROMETHEUS_START_TIMEOUT="${SAGAS_PROMETHEUS_START_TIMEOUT:-60}"

prometheus_running() {
  local pid; pid="$(cat "$PROMETHEUS_PID" 2>/dev/null)" || return 1
  [[ -n "$pid" ]] && proc_alive "$pid"
}

prometheus_install() {
  command -v prometheus >/dev/null && command -v promtool >/dev/null && return 0
  # --no-install-recommends: the exporters and the system service's extras are not wanted here.
  apt_install --no-install-recommends prometheus
}

prometheus_configure() {
  mkdir -p "$PROMETHEUS_STATE/data" "$PROMETHEUS_TARGETS"
  # Each test writes <name>.json (file_sd format) here and removes it after; Prometheus rereads them every second.
  cat >"$PROMETHEUS_STATE/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - $REPO_DIR/docs/prometheus/alerts.yml
scrape_configs:
  - job_name: sagas
    file_sd_configs:
      - files: ["$PROMETHEUS_TARGETS/*.json"]
        refresh_interval: 1s
EOF
  promtool check config "$PROMETHEUS_STATE/prometheus.yml" >/dev/null
}

prometheus_start() {
  if nothing_to_start prometheus "$PROMETHEUS_PORT" SAGAS_TEST_PROMETHEUS_URL; then return 0; fi
  local t0; t0=$(now_ms)
  prometheus_install
  prometheus_configure
  log "prometheus: starting on 127.0.0.1:$PROMETHEUS_PORT (data $PROMETHEUS_STATE/data)"
  setsid nohup prometheus --config.file="$PROMETHEUS_STATE/prometheus.yml" \
    --storage.tsdb.path="$PROMETHEUS_STATE/data" --storage.tsdb.retention.time=1d \
    --web.listen-address="127.0.0.1:$PROMETHEUS_PORT" </dev/null >"$PROMETHEUS_LOG" 2>&1 9>&- &
  echo $! >"$PROMETHEUS_PID"
  touch "$(marker prometheus)"
  local deadline=$(( $(date +%s) + PROMETHEUS_START_TIMEOUT ))
  until curl -fsS "http://127.0.0.1:$PROMETHEUS_PORT/-/ready" >/dev/null 2>&1; do
    if ! prometheus_running; then show_tail "$PROMETHEUS_LOG"; rm -f "$(marker prometheus)" "$PROMETHEUS_PID"; die "prometheus exited during startup (log: $PROMETHEUS_LOG)"; fi
    if (( $(date +%s) > deadline )); then show_tail "$PROMETHEUS_LOG"; prometheus_stop; die "prometheus not ready after ${PROMETHEUS_START_TIMEOUT}s"; fi
    sleep 0.2
  done
  log "prometheus: ready in $(elapsed "$t0") -> $DEFAULT_PROMETHEUS_URL (targets: $PROMETHEUS_TARGETS)"
}

prometheus_stop() {
  if prometheus_running; then
    local pid; pid="$(cat "$PROMETHEUS_PID")"
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$(( $(date +%s) + 20 ))
    while proc_alive "$pid" && (( $(date +%s) < deadline )); do sleep 0.2; done
    if proc_alive "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
    log "prometheus: stopped"
  else
    log "prometheus: was not running"
  fi
  rm -f "$(marker prometheus)" "$PROMETHEUS_PID"
}

prometheus_status() {
  status_line prometheus "$PROMETHEUS_PORT" SAGAS_TEST_PROMETHEUS_URL "$(cat "$PROMETHEUS_PID" 2>/dev/null || echo '?')"
}

# ----------------------------------------------------------------------------------------------
usage() {
 awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}" >&2; exit 2; }

services_of() {
  case "${1:-all}" in
    all) echo "postgres kafka rabbitmq prometheus" ;;
    postgres | pg) echo "postgres" ;;
    kafka) echo "kafka" ;;
    rabbitmq | rabbit) echo "rabbitmq" ;;
    prometheus | prom) echo "prometheus" ;;
    *) usage ;;
  esac
}

# Serialise concurrent invocations (e.g. parallel test workers all calling `start`). Servers are
# launched with fd 9 closed: a daemon that inherited it would hold the lock for its whole life.
lock() {
  mkdir -p "$STATE_DIR"; exec 9>"$STATE_DIR/.lock"
  flock -w 300 9 || die "$STATE_DIR/.lock is held by another services.sh for 300 s"
}

svc() { case "$1" in postgres) echo pg ;; kafka) echo kafka ;; rabbitmq) echo rabbitmq ;; prometheus) echo prometheus ;; esac; }

# Stop only what this script started (marker file); anything else is left alone. Written as an
# `if` on purpose: a function called as `f || x` would run with `set -e` switched off inside.
stop_service() {
  if started_by_us "$1"; then "$(svc "$1")_stop"; else log "$1: not started by this script; leaving it alone"; fi
}

main() {
  local cmd="${1:-}" what="${2:-all}" list s rc=0
  [[ -n "$cmd" && "$cmd" != env ]] && list="$(services_of "$what")"   # exits 2 on a bad name
  case "$cmd" in
    start)
      lock; for s in $list; do "$(svc "$s")_start"; done ;;
    stop)
      # Stopping something we did not start is not an error for the bulk command.
      lock; for s in $list; do stop_service "$s"; done ;;
    start-one | resume)
      [[ $# -eq 2 && "$what" != all ]] || usage
      lock; "$(svc "$list")_start" ;;
    stop-one | pause)
      # Here it IS an error: an outage test must not believe it stopped a server it did not.
      [[ $# -eq 2 && "$what" != all ]] || usage
      lock; started_by_us "$list" || rc=1
      stop_service "$list" ;;
    status)
      for s in $list; do "$(svc "$s")_status"; done ;;
    close-connections)
      [[ "$list" == rabbitmq ]] || usage
      started_by_us rabbitmq || die "rabbitmq: not started by this script"
      rabbitmq_close_connections ;;
    env)
      printf 'export SAGAS_TEST_PG_URL=%q\n' "${SAGAS_TEST_PG_URL:-$DEFAULT_PG_URL}"
      printf 'export SAGAS_TEST_KAFKA_URL=%q\n' "${SAGAS_TEST_KAFKA_URL:-$DEFAULT_KAFKA_URL}"
      printf 'export SAGAS_TEST_AMQP_URL=%q\n' "${SAGAS_TEST_AMQP_URL:-$DEFAULT_AMQP_URL}"
      printf 'export SAGAS_TEST_PROMETHEUS_URL=%q\n' "${SAGAS_TEST_PROMETHEUS_URL:-$DEFAULT_PROMETHEUS_URL}"
      printf 'export SAGAS_TEST_PROMETHEUS_TARGETS=%q\n' "${SAGAS_TEST_PROMETHEUS_TARGETS:-$PROMETHEUS_TARGETS}"
      printf 'export SAGAS_TEST_AMQP_MANAGEMENT_URL=%q\n' "${SAGAS_TEST_AMQP_MANAGEMENT_URL:-$DEFAULT_AMQP_MANAGEMENT_URL}" ;;
    *) usage ;;
  esac
  return "$rc"
}

main "$@"
