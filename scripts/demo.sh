#!/usr/bin/env bash
# The whole kbfs story on one machine: a relay, a share of a generated sample dataset,
# pointers written into a separate folder, a FUSE mount of those pointers, and every file
# read back through the mount and checked against the original's SHA-1.
#   scripts/demo.sh          run the demo (stops a previous one first); leaves it running
#   scripts/demo.sh stop     unmount and stop the demo's relay and share
set -euo pipefail
cd "$(dirname "$0")/.."
KBFS="$PWD/.venv/bin/kbfs"
PY="$PWD/.venv/bin/python"
DEMO="${KBFS_DEMO_DIR:-/tmp/kbfs-demo}"

stop() {
  if [ -d "$DEMO/mnt" ] && mountpoint -q "$DEMO/mnt"; then "$KBFS" umount "$DEMO/mnt" || fusermount3 -uz "$DEMO/mnt" || true; fi
  for p in share relay; do
    if [ -f "$DEMO/$p.pid" ]; then
      pid=$(cat "$DEMO/$p.pid"); kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      rm -f "$DEMO/$p.pid"
    fi
  done
}

if [ "${1:-}" = stop ]; then stop; echo "kbfs demo stopped."; exit 0; fi
stop
rm -rf "$DEMO"; mkdir -p "$DEMO"/{data/session1,pointers,mnt,state,cache}

echo "== 1. a sample dataset (what a lab would have)"
"$PY" - "$DEMO/data" <<'PY'
import os, sys
root = sys.argv[1]
rng = __import__("random").Random(42)
def write(rel, size):
    with open(os.path.join(root, rel), "wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20); f.write(rng.randbytes(n)); left -= n
with open(os.path.join(root, "recording.mda"), "wb") as f:  # .mda: int16, 16 channels x N
    f.write(__import__("struct").pack("<iiiii", -4, 2, 2, 16, (48 << 20) // 32))
write_to = f.name
with open(write_to, "ab") as f:
    f.write(rng.randbytes(48 << 20))
write("session1/spikes.bin", 5 * (1 << 20) + 12345)
with open(os.path.join(root, "session1", "notes.csv"), "w") as f:
    f.write("channel,rate\n" + "".join(f"{i},{rng.random():.4f}\n" for i in range(1000)))
PY
du -ah "$DEMO/data" | sed 's/^/   /'

port=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
RELAY="http://127.0.0.1:$port"
echo "== 2. a relay on $RELAY"
"$KBFS" relay --host 127.0.0.1 --port "$port" --state-dir "$DEMO/state/relay" >"$DEMO/relay.log" 2>&1 &
echo $! >"$DEMO/relay.pid"
for _ in $(seq 100); do curl -fs "$RELAY/api/health" >/dev/null 2>&1 && break; sleep 0.1; done

echo "== 3. the lab shares its folder (outbound connection only)"
"$KBFS" share "$DEMO/data" --relay "$RELAY" --state-dir "$DEMO/state/share" >"$DEMO/share.log" 2>&1 &
echo $! >"$DEMO/share.pid"
for _ in $(seq 300); do
  n=$(curl -fs "$RELAY/api/shares" 2>/dev/null | "$PY" -c 'import json,sys; print(sum(s["files"] for s in json.load(sys.stdin)))' 2>/dev/null || echo 0)
  [ "$n" = 3 ] && break; sleep 0.1
done
curl -fs "$RELAY/api/shares" | "$PY" -m json.tool | sed 's/^/   /'

echo "== 4. pointers, written into a separate folder (these are what you email)"
"$KBFS" prv create "$DEMO/data/recording.mda" -o "$DEMO/pointers/recording.mda.prv" >/dev/null
"$KBFS" prv create "$DEMO/data/session1" -o "$DEMO/pointers/session1.prvdir" >/dev/null
ls -l "$DEMO/pointers" | sed 's/^/   /'

echo "== 5. mount the pointers: every NAME.prv shows up as NAME"
# --no-local: the originals sit on this same machine, and kbfs would rightly read them
# directly; the demo wants every byte to travel share -> relay -> mount as it would abroad.
"$KBFS" mount "$DEMO/pointers" "$DEMO/mnt" --relay "$RELAY" --cache-dir "$DEMO/cache" --no-local
ls -lR "$DEMO/mnt" | sed 's/^/   /'

echo "== 6. read every file back through the mount and check its SHA-1"
ok=0
while IFS= read -r rel; do
  a=$(sha1sum <"$DEMO/data/$rel" | cut -d' ' -f1); b=$(sha1sum <"$DEMO/mnt/$rel" | cut -d' ' -f1)
  if [ "$a" = "$b" ]; then echo "   OK   $b  $rel"; ok=$((ok+1)); else echo "   FAIL $rel"; exit 1; fi
done < <(cd "$DEMO/data" && find . -type f | sed 's|^\./||' | sort)
xattr_verified=$("$PY" -c 'import os,sys; print(os.getxattr(sys.argv[1], "user.kbfs.verified").decode())' "$DEMO/mnt/recording.mda")
echo "   recording.mda verified by: $xattr_verified"
sleep 2.5  # the daemon refreshes its status file every 2 s
"$KBFS" status "$DEMO/mnt" | sed 's/^/   /' || true

share_id=$(curl -fs "$RELAY/api/shares" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')
view_link=$("$KBFS" view link "kbfs://127.0.0.1:$port/$share_id/recording.mda" --state 'ch=0-15' 2>/dev/null || echo "(kbfs view link failed)")
cat <<MSG

Done: $ok files read through the mount, every SHA-1 matches.
  web page:      $RELAY/          (this share: $RELAY/s/$share_id/list)
  view link:     $view_link
  data shared:   $DEMO/data        (kbfs share, log $DEMO/share.log)
  relay:         $RELAY            (log $DEMO/relay.log)
  pointers:      $DEMO/pointers
  mounted at:    $DEMO/mnt          (cache $DEMO/cache)
Try:   ls -l $DEMO/mnt ; kbfs status $DEMO/mnt
Stop:  make demo-stop     (or: scripts/demo.sh stop)
MSG
