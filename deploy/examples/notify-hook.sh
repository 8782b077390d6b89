#!/bin/sh
# A tether client hook that tells the person at the desk about an outage.
#
#   tether client ... --on-detach /usr/local/lib/tether/notify-hook.sh \
#                     --on-resume /usr/local/lib/tether/notify-hook.sh \
#                     --on-end    /usr/local/lib/tether/notify-hook.sh
#
# tether runs it directly (no shell in between) with, in its environment:
#   TETHER_EVENT            detach, resume or end
#   TETHER_SESSION          the session, as the log names it (#3/2dd9c6618d39)
#   TETHER_SERVER           the tether server, HOST:PORT
#   TETHER_REASON           why (the link loss, or why the session ended)
#   TETHER_OUTAGE_SECONDS   how long the session has been (resume: was) without a link
#   TETHER_EXPIRES_SECONDS  detach: seconds left before the session expires
#   TETHER_REPLAYED_BYTES   resume: bytes sent again after the outage
#   TETHER_CLOSE_CODE       end: NORMAL, EXPIRED, GOING_AWAY, ...
# It is killed after --hook-timeout (30 s); keep it short.
#
# It raises a desktop notification (notify-send, for the user's desktop session), or, with
# no desktop, writes to the terminals (wall); and it always leaves a line in the system log
# (logger).

set -u
event=${TETHER_EVENT:-unknown}
session=${TETHER_SESSION:-?}
case "$event" in
detach)
    urgency=critical
    title="Connection interrupted"
    body="Reconnecting to ${TETHER_SERVER:-the server}; your session is kept for ${TETHER_EXPIRES_SECONDS:-?} s. (${TETHER_REASON:-})"
    ;;
resume)
    urgency=normal
    title="Connection restored"
    body="Back after ${TETHER_OUTAGE_SECONDS:-?} s; nothing was lost."
    ;;
end)
    [ "${TETHER_CLOSE_CODE:-}" = NORMAL ] && exit 0  # a normal end needs no notice
    urgency=critical
    title="Session ended"
    body="${TETHER_CLOSE_CODE:-?}: ${TETHER_REASON:-}"
    ;;
*)
    exit 0
    ;;
esac

logger -t tether-hook -- "session $session: $title: $body" 2>/dev/null || true
if [ -n "${DISPLAY:-}${WAYLAND_DISPLAY:-}" ] && command -v notify-send >/dev/null 2>&1; then
    notify-send --app-name=tether --urgency="$urgency" "$title" "$body"
elif command -v wall >/dev/null 2>&1; then
    printf '%s\n%s\n' "tether: $title" "$body" | wall 2>/dev/null || true
fi
exit 0
