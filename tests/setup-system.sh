#!/usr/bin/env bash
# Installs the Debian packages the tests need, when missing and when we may (root + apt).
set -euo pipefail
need=()
[ -e /usr/lib/rabbitmq/bin/rabbitmq-server ] || need+=(rabbitmq-server)
ldconfig -p 2>/dev/null | grep -q 'libmagic\.so\.1' || need+=(libmagic1)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "tests need Debian packages: ${need[*]} (install them, or run make test as root)" >&2
    exit 0
fi
echo "installing ${need[*]}"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
