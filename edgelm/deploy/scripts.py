"""The scripts a bundle carries for the device: ``install.sh`` (offline install, refuses a damaged copy),
``edgelm-serve`` (the launcher: `edgelm serve` with the plan's settings) and ``edgelm-serve.service`` (a systemd
unit for it).  POSIX sh and coreutils only: the device needs nothing but Python 3 with venv.
"""

from __future__ import annotations

import shlex

INSTALL = "install.sh"
LAUNCHER = "edgelm-serve"
UNIT = "edgelm-serve.service"
ENV_FILE = "serve.env"

_INSTALL = r"""#!/bin/sh
# Installs this edgelm bundle with no network (written by `edgelm bundle`; see README.txt).
#   sh install.sh [PREFIX]      PREFIX: where the virtual environment goes [default: $HOME/edgelm]
# Every file is checked against SHA256SUMS first: a damaged or edited copy is refused, naming the file.
set -eu
HERE=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)
PREFIX=${1:-${EDGELM_PREFIX:-$HOME/edgelm}}
PYTHON=${PYTHON:-python3}
cd "$HERE"

echo "edgelm bundle @TITLE@"
echo "checking $(wc -l < SHA256SUMS) files against SHA256SUMS"
if ! failed=$(sha256sum --check --strict --quiet SHA256SUMS 2>&1); then
  echo "install.sh: refusing this bundle, these files do not match SHA256SUMS (a damaged or edited copy):" >&2
  printf '%s\n' "$failed" | sed 's/^/  /' >&2
  echo "Copy the bundle again from the machine that built it." >&2
  exit 3
fi
find . -type f | sed 's|^\./||' | sort > "${TMPDIR:-/tmp}/edgelm-bundle-files.$$"
cut -c67- SHA256SUMS | sort | comm -23 "${TMPDIR:-/tmp}/edgelm-bundle-files.$$" - | grep -vx 'SHA256SUMS' \
  > "${TMPDIR:-/tmp}/edgelm-bundle-extra.$$" || true
if [ -s "${TMPDIR:-/tmp}/edgelm-bundle-extra.$$" ]; then
  echo "install.sh: refusing this bundle, these files are not in SHA256SUMS:" >&2
  sed 's/^/  /' "${TMPDIR:-/tmp}/edgelm-bundle-extra.$$" >&2
  rm -f "${TMPDIR:-/tmp}/edgelm-bundle-files.$$" "${TMPDIR:-/tmp}/edgelm-bundle-extra.$$"
  exit 3
fi
rm -f "${TMPDIR:-/tmp}/edgelm-bundle-files.$$" "${TMPDIR:-/tmp}/edgelm-bundle-extra.$$"

machine=$(uname -m)
if [ "$machine" != "@MACHINE@" ]; then
  echo "install.sh: this bundle is for @MACHINE@, this machine is $machine." >&2
  echo "Build one for it: edgelm bundle MODEL --profile PROFILE (edgelm devices lists them)." >&2
  exit 4
fi
if ! pyver=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])'); then
  echo "install.sh: no $PYTHON here. Install Python @PYTHON@ (sudo apt install python3 python3-venv)," >&2
  echo "or name it: PYTHON=/path/to/python3 sh install.sh" >&2
  exit 4
fi
if [ "$pyver" != "@PYTHON@" ]; then
  echo "install.sh: the wheels are for Python @PYTHON@, $PYTHON is $pyver." >&2
  echo "Build the bundle with: edgelm bundle ... --python $pyver (or PYTHON=python@PYTHON@ sh install.sh)" >&2
  exit 4
fi

echo "creating the virtual environment $PREFIX"
"$PYTHON" -m venv "$PREFIX"
echo "installing @REQUIREMENT@ from wheels/ (no network)"
"$PREFIX/bin/python" -m pip install --no-index --find-links "$HERE/wheels" --disable-pip-version-check \
  --no-warn-script-location -q "@REQUIREMENT@"

mkdir -p "$PREFIX/models"
echo "copying the model to $PREFIX/models/@MODEL_FILE@"
cp "$HERE/model/@MODEL_FILE@" "$PREFIX/models/@MODEL_FILE@.partial"
mv "$PREFIX/models/@MODEL_FILE@.partial" "$PREFIX/models/@MODEL_FILE@"
cp "$HERE/@LAUNCHER@" "$PREFIX/bin/@LAUNCHER@"
chmod 755 "$PREFIX/bin/@LAUNCHER@"
if [ -f "$HERE/@ENV_FILE@" ]; then
  (umask 077; cp "$HERE/@ENV_FILE@" "$PREFIX/@ENV_FILE@")
fi
user=$(id -un 2>/dev/null) || user=$(id -u)  # a user with no name (no passwd entry): its number
sed -e "s|@@PREFIX@@|$PREFIX|g" -e "s|@@USER@@|$user|g" "$HERE/@UNIT@" > "$PREFIX/@UNIT@"
cp "$HERE/manifest.json" "$PREFIX/bundle-manifest.json"

echo "installed. Try:"
echo "  $PREFIX/bin/edgelm run $PREFIX/models/@MODEL_FILE@ \"Hello\""
echo "  $PREFIX/bin/@LAUNCHER@            # edgelm serve with the plan's settings on @HOST@:@PORT@"
echo "start it at boot:  sudo cp $PREFIX/@UNIT@ /etc/systemd/system/ && sudo systemctl enable --now @UNIT@"
"""

_LAUNCHER = r"""#!/bin/sh
# `edgelm serve` with the settings of the plan for @TITLE@ (written by `edgelm bundle`).
# Extra arguments are passed on (they win over these): edgelm-serve --port 9000
PREFIX=$(CDPATH= cd -- "$(dirname -- "$0")/.." && pwd)
if [ -f "$PREFIX/@ENV_FILE@" ]; then
  . "$PREFIX/@ENV_FILE@"
  export EDGELM_API_KEY
fi
exec "$PREFIX/bin/edgelm" serve "@MODEL_NAME@=$PREFIX/models/@MODEL_FILE@" @ARGS@ "$@"
"""

_UNIT = """[Unit]
Description=edgelm serve: @MODEL_NAME@ (@TITLE@)
After=network.target

[Service]
Type=simple
User=@@USER@@
ExecStart=@@PREFIX@@/bin/@LAUNCHER@
Restart=on-failure
RestartSec=5
Nice=5

[Install]
WantedBy=multi-user.target
"""


def _fill(template: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        template = template.replace(f"@{key}@", value)
    return template


def install_script(*, title: str, machine: str, python: str, requirement: str, model_file: str, host: str,
                   port: int) -> str:
    return _fill(_INSTALL, {"TITLE": title, "MACHINE": machine, "PYTHON": python, "REQUIREMENT": requirement,
                            "MODEL_FILE": model_file, "LAUNCHER": LAUNCHER, "UNIT": UNIT, "ENV_FILE": ENV_FILE,
                            "HOST": host, "PORT": str(port)})


def launcher(*, title: str, model_name: str, model_file: str, args: list[str]) -> str:
    return _fill(_LAUNCHER, {"TITLE": title, "MODEL_NAME": model_name, "MODEL_FILE": model_file,
                             "ENV_FILE": ENV_FILE, "ARGS": " ".join(shlex.quote(a) for a in args)})


def unit(*, title: str, model_name: str) -> str:
    return _fill(_UNIT, {"TITLE": title, "MODEL_NAME": model_name, "LAUNCHER": LAUNCHER})


def env_file(api_key: str) -> str:
    return f"# read by {LAUNCHER}: the key clients send (Authorization: Bearer KEY)\nEDGELM_API_KEY={shlex.quote(api_key)}\n"
