#!/bin/sh
# layer 1 adds the application
. /etc/app/config 2>/dev/null || true
echo "app ${APP_VERSION:-unknown} running on $(cat /etc/hostname)"
