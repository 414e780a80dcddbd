# kooagent .rpm %preun ($1: 0 = removal, 1 = upgrade): stop and disable on removal.
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
    systemctl disable --now kooagent.service >/dev/null 2>&1 || :
elif [ "$1" -eq 0 ] && [ -x /etc/rc.d/init.d/kooagent ]; then
    /etc/rc.d/init.d/kooagent stop || :
    command -v chkconfig >/dev/null 2>&1 && chkconfig --del kooagent >/dev/null 2>&1 || :
fi
exit 0
