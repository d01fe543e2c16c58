#!/usr/bin/env bash
# Makes a local stand-in for a base image that no registry can serve here, from Debian's own packages:
#   deploy/docker/standin.sh python:3.11-slim-bookworm   Debian bookworm + its python3 (3.11), as the official image
#   deploy/docker/standin.sh nginx:1.27-alpine           Debian bookworm + nginx-light and wget (what compose uses)
# `debootstrap --variant=minbase bookworm` builds the root file system, `docker import` turns it into an image with
# the official image's tag, so the Dockerfile and docker-compose.yml are built and run exactly as a user's are.
# The build host's CA bundle goes into the stand-in (never into the Dockerfile): apt and pip inside `docker build
# --network host` then trust whatever TLS the host trusts. Needs root, debootstrap and a running Docker engine.
# Does nothing when the image is already present or can be pulled.
set -euo pipefail
tag=$1
docker=${DOCKER:-docker}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if "$docker" image inspect "$tag" >/dev/null 2>&1; then exit 0; fi
if timeout 60 "$docker" pull -q "$tag" >/dev/null 2>&1; then exit 0; fi
echo "$tag cannot be pulled: building a stand-in from Debian bookworm" >&2

case "$tag" in
  python:3.11-slim-bookworm)
    packages=python3,python3-venv,python-is-python3,ca-certificates
    changes=(--change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin'
             --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]') ;;
  nginx:1.27-alpine)
    packages=nginx-light,wget,ca-certificates
    changes=(--change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
             --change 'CMD ["nginx", "-g", "daemon off;"]') ;;
  *) echo "no stand-in recipe for $tag" >&2; exit 1 ;;
esac

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include="$packages" bookworm "$root" "$mirror" >"$root.log" 2>&1 \
  || { tail -20 "$root.log" >&2; exit 1; }
rm -f "$root.log"
cat >"$root/etc/apt/sources.list" <<SOURCES
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb ${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security} bookworm-security main
SOURCES
# The host's bundle, where update-ca-certificates (run by any later ca-certificates upgrade) keeps it.
install -m 644 /etc/ssl/certs/ca-certificates.crt "$root/usr/local/share/ca-certificates/build-host.crt"
install -m 644 /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/tmp/* "$root"/dev/*
tar -C "$root" -c . | "$docker" import "${changes[@]}" - "$tag" >/dev/null
echo "stand-in $tag: $("$docker" image inspect -f '{{.Size}}' "$tag" | numfmt --to=si)B" >&2
