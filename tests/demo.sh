#!/usr/bin/env bash
# tests/demo.sh -- the demo: a local RGW, a bucket, a fresh key file, a mount at
# /tmp/s3ssefs-demo/mnt, and proof that files round-trip while the bucket holds only
# ciphertext nobody can read without the key. The mount is left running.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/setup.sh
eval "$(bash tests/rgw-up.sh 2>/dev/null)"
D=/tmp/s3ssefs-demo
S3SSEFS=".venv/bin/s3ssefs"
if mountpoint -q "$D/mnt" 2>/dev/null; then "$S3SSEFS" umount "$D/mnt"; fi
rm -rf "$D"; mkdir -p "$D/mnt"
BUCKET=demo-$(date +%s)
.venv/bin/python - "$BUCKET" <<'PY'
import os, sys, boto3
from botocore.config import Config
boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT"],
             config=Config(s3={"addressing_style": "path"})).create_bucket(Bucket=sys.argv[1])
PY
echo "== a fresh key file"
"$S3SSEFS" keygen "$D/keys.toml"
"$S3SSEFS" keys list "$D/keys.toml"
echo "== mount s3://$BUCKET on $D/mnt"
"$S3SSEFS" mount "$BUCKET" "$D/mnt" --keyfile "$D/keys.toml" --endpoint "$S3_ENDPOINT" \
    --ca-bundle "$AWS_CA_BUNDLE" --cache-dir "$D/cache" --log-file "$D/s3ssefs.log"
echo "== files round-trip"
echo "quarterly report: the numbers are good" > "$D/mnt/report.txt"
mkdir "$D/mnt/archive"
head -c 20M /dev/urandom > "$D/big.bin"; cp "$D/big.bin" "$D/mnt/archive/big.bin"
ls -l "$D/mnt" "$D/mnt/archive"
cat "$D/mnt/report.txt"
cmp "$D/big.bin" "$D/mnt/archive/big.bin" && echo "archive/big.bin: 20 MiB identical"
echo "== the bucket holds ciphertext only"
.venv/bin/python - "$BUCKET" <<'PY'
import os, sys, boto3
from botocore.config import Config
from botocore.exceptions import ClientError
s3 = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT"],
                  config=Config(s3={"addressing_style": "path"}))
for key in ("report.txt", "archive/big.bin"):
    try:
        s3.get_object(Bucket=sys.argv[1], Key=key)
        print(f"s3://{sys.argv[1]}/{key}: READABLE WITHOUT THE KEY (bug!)")
        sys.exit(1)
    except ClientError as e:
        print(f"s3://{sys.argv[1]}/{key} without the key: "
              f"{e.response['ResponseMetadata']['HTTPStatusCode']} {e.response['Error']['Code']}")
PY
echo "== the mount stays up: $D/mnt  (stop it with: $S3SSEFS umount $D/mnt)"
