#!/bin/sh
# What the official redis image's entrypoint does that the compose files rely on.
set -e
case "$1" in
    -*|*.conf) set -- redis-server "$@" ;;
esac
if [ "$1" = redis-server ]; then
    # no config file given: protected mode would refuse every client from another
    # container, so the official image turns it off
    if [ ! -f "$2" ] || ! grep -q '^protected-mode' "$2"; then
        set -- "$@" --protected-mode no
    fi
    if [ "$(id -u)" = 0 ]; then
        chown -R redis:redis /data 2>/dev/null || true
        exec setpriv --reuid=redis --regid=redis --init-groups "$@"
    fi
fi
exec "$@"
