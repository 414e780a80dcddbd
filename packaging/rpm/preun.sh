# kooagent .rpm %preun ($1: 0 = removal, 1 = upgrade): stop and disable on removal.
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
    systemctl disable --now kooagent.service >/dev/null 2>&1 || :
fi
exit 0
