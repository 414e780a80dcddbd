# kooagent .rpm %pre: the system user (no login shell, no password, no home).
getent group kooagent >/dev/null || groupadd -r kooagent
getent passwd kooagent >/dev/null || \
    useradd -r -g kooagent -d /nonexistent -M -s /sbin/nologin -c "KooAgent daemon" kooagent
exit 0
