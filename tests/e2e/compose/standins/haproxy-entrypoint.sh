#!/bin/sh
# What the official haproxy image's entrypoint does: "-..." arguments go to haproxy,
# which runs master-worker (-W) in the foreground (-db).
set -e
case "$1" in
    -*) set -- haproxy "$@" ;;
esac
if [ "$1" = haproxy ]; then
    shift
    set -- haproxy -W -db "$@"
fi
exec "$@"
