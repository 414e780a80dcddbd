# kooagent .rpm %post ($1: 1 = install, 2 = upgrade): directories, backoff drop-in, enable + start.
install -d -m 0755 -o root -g root /etc/kooagent
install -d -m 0700 -o kooagent -g kooagent /var/lib/kooagent
dropin=/etc/systemd/system/kooagent.service.d/restart-backoff.conf
v=$(systemctl --version 2>/dev/null | sed -n '1s/^systemd \([0-9]*\).*/\1/p')
if [ "${v:-0}" -ge 254 ]; then
    mkdir -p /etc/systemd/system/kooagent.service.d
    ln -sf /usr/share/kooagent/restart-backoff.conf "$dropin"
else
    rm -f "$dropin"
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -eq 1 ]; then
        systemctl enable --now kooagent.service >/dev/null 2>&1 || :
    else
        systemctl try-restart kooagent.service >/dev/null 2>&1 || :
    fi
elif [ -x /etc/rc.d/init.d/kooagent ]; then
    # No systemd running (a container, an old or minimal system): the SysV script.
    command -v chkconfig >/dev/null 2>&1 && chkconfig --add kooagent >/dev/null 2>&1 || :
    if [ "$1" -eq 1 ]; then
        /etc/rc.d/init.d/kooagent start || :
    elif /etc/rc.d/init.d/kooagent status >/dev/null 2>&1; then
        /etc/rc.d/init.d/kooagent restart || :
    fi
fi
exit 0
