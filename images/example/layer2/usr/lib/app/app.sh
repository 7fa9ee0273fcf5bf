#!/bin/sh
# layer 2 replaces the application script
. /etc/app/config
echo "app $APP_VERSION running on $(cat /etc/hostname), logging to $APP_LOG"
