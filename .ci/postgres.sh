# Sourced by .ci/run: start a throwaway PostgreSQL server on loopback for the distributed-tuning tests, export its URL
# as ATTN_TUNE_TEST_POSTGRES_URL, stop it and remove its files on exit. Without PostgreSQL (and no way to install
# Debian's package) it says so and those tests skip with that reason; the rest of the suite runs anyway.

# ATTN_TUNE_PG_PREFIX: where Debian's server versions live (a test points it at an empty folder).
_pg_bin() {
    local found=() dir
    for dir in "${ATTN_TUNE_PG_PREFIX:-/usr/lib/postgresql}"/*/bin; do
        [ -x "$dir/initdb" ] && found+=("$dir")
    done
    [ "${#found[@]}" -gt 0 ] && printf '%s\n' "${found[@]}" | sort -V | tail -n 1
    return 0
}

PG_BIN="$(_pg_bin)"
if [ -z "$PG_BIN" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing PostgreSQL (Debian's postgresql package) for the distributed-tuning tests"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null 2>&1; } \
        || true
    PG_BIN="$(_pg_bin)"
fi

if [ -z "$PG_BIN" ]; then
    echo "no PostgreSQL server available: the distributed-tuning tests will skip"
else
    PG_DIR="$(mktemp -d)"
    PG_AS=()
    if [ "$(id -u)" = 0 ]; then  # PostgreSQL refuses to run as root: run it as the package's postgres user
        chown postgres "$PG_DIR"
        PG_AS=(runuser -u postgres --)
    fi
    PG_PASSWORD="$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"
    PG_PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    printf '%s\n' "$PG_PASSWORD" > "$PG_DIR/pw"
    [ "$(id -u)" = 0 ] && chown postgres "$PG_DIR/pw"
    "${PG_AS[@]}" "$PG_BIN/initdb" -D "$PG_DIR/data" -U attn --auth-host=scram-sha-256 --auth-local=trust \
        --pwfile="$PG_DIR/pw" >/dev/null
    rm -f "$PG_DIR/pw"
    "${PG_AS[@]}" "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/log" -w \
        -o "-p $PG_PORT -k $PG_DIR -c listen_addresses=127.0.0.1" start >/dev/null
    _pg_stop() { "${PG_AS[@]}" "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m fast -w stop >/dev/null || true; rm -rf "$PG_DIR"; }
    trap _pg_stop EXIT
    "${PG_AS[@]}" "$PG_BIN/psql" -q -h "$PG_DIR" -p "$PG_PORT" -U attn -d postgres -c "CREATE DATABASE attn_tune_test" >/dev/null
    export ATTN_TUNE_TEST_POSTGRES_URL="postgresql://attn:${PG_PASSWORD}@127.0.0.1:${PG_PORT}/attn_tune_test"
    echo "PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PG_PORT for the distributed-tuning tests"
fi
