# kooagent .rpm %postun ($1: 0 = removal): state and config are kept (rpm has no purge;
# remove /var/lib/kooagent and /etc/kooagent by hand, or use `kooagent-install uninstall --purge`).
if [ "$1" -eq 0 ]; then
    rm -f /etc/systemd/system/kooagent.service.d/restart-backoff.conf
    rmdir /etc/systemd/system/kooagent.service.d 2>/dev/null || :
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
exit 0
