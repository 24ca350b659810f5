#!/usr/bin/env bash
# Posts every photo of a folder to a running flukeid server, one request at
# a time, and writes the answers as a Kaggle submission plus the per-request
# wall time, so `flukeid evaluate` can score what the HTTP service answered.
#
#   scripts/identify-over-http.sh DIR OUT.csv [URL]
#
# URL defaults to http://127.0.0.1:8080. Needs curl and python3.
set -euo pipefail
dir=${1:?usage: identify-over-http.sh DIR OUT.csv [URL]}
out=${2:?usage: identify-over-http.sh DIR OUT.csv [URL]}
url=${3:-http://127.0.0.1:8080}
answers=$(mktemp)
trap 'rm -f "$answers"' EXIT

for photo in "$dir"/*; do
  case "${photo,,}" in *.jpg|*.jpeg|*.png|*.webp|*.gif|*.tif|*.tiff|*.bmp) ;; *) continue ;; esac
  body=$(curl -sS -w '\n%{http_code} %{time_total}' -F "image=@$photo" "$url/v1/identify")
  status=$(tail -n1 <<<"$body")
  printf '%s\t%s\t%s\n' "$(basename "$photo")" "$status" "$(head -n -1 <<<"$body")" >>"$answers"
done

python3 - "$answers" "$out" <<'PY'
import json, statistics, sys
rows, times, failed = [], [], 0
for line in open(sys.argv[1]):
    name, status, body = line.rstrip("\n").split("\t", 2)
    code, seconds = status.split()
    if code != "200":
        failed += 1
        print(f"{name}: HTTP {code} {body}", file=sys.stderr)
        continue
    answer = json.loads(body)
    rows.append((name, " ".join(p["whale_id"] for p in answer["predictions"])))
    times.append(float(seconds) * 1000)
with open(sys.argv[2], "w") as f:
    f.write("Image,Id\n")
    for name, ids in rows:
        f.write(f"{name},{ids}\n")
print(f"{len(rows)} answered, {failed} failed; wall time per request: "
      f"median {statistics.median(times):.0f} ms, mean {statistics.mean(times):.0f} ms, max {max(times):.0f} ms")
PY
