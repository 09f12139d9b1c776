#!/bin/sh
# pipeconnect-outbound-rule: the NAT rule of outbound mode (docs/outbound.md), the one
# definition that README.md, docs/outbound.md, deploy/compose, deploy/kubernetes and
# deploy/systemd use (tests/test_deploy.py holds them to it and runs it in a network
# namespace with iptables and with nftables).
#
# The MTA's outgoing TCP connections to port 25 are redirected to the proxy's outbound
# listener (127.0.0.1:PORT; [::1]:PORT with --ipv6). The proxy's own connections to the MXes
# must escape the rule: it runs as another user (--mta-user, --except-user), or marks its
# sockets (outbound.socket_mark, --mark).
#
#   outbound-rule.sh add    OPTIONS   install the rule (replaces what an earlier run installed)
#   outbound-rule.sh delete OPTIONS   remove it (nothing to remove is not an error)
#   outbound-rule.sh print  OPTIONS   show the rule without touching anything
#   outbound-rule.sh show   OPTIONS   show what is installed now
#
# OPTIONS (one of --mta-user, --except-user, --mark at least):
#   --mta-user USER     redirect this user's connections: the user the MTA delivers as
#                       (Postfix: postfix; Debian's Exim: Debian-exim). A name or a uid.
#   --except-user USER  redirect every user's connections but this one: the proxy's, in a
#                       network namespace only the MTA and the proxy use (a pod, a compose
#                       service's namespace): uid 10025 in the proxy's image.
#   --mark MARK         let sockets with this mark through first (the proxy's
#                       outbound.socket_mark; setting it needs CAP_NET_ADMIN in the proxy).
#   --port PORT         the outbound listener's port (outbound.listen), default 10025.
#   --ipv6              IPv6 as well (ip6tables, an ip6 table); outbound.listen must then
#                       include "[::1]:PORT", or the MTA's IPv6 deliveries are refused.
#   --backend nft|iptables  default: nft when it is installed, else iptables.
#
# Needs root (CAP_NET_ADMIN) in the MTA's network namespace: run it there, e.g. in an init
# container sharing it, or with `ip netns exec`. nftables: a table "pipeconnect" of its own
# (families ip, ip6), replaced as a whole. iptables: rules appended to the nat OUTPUT chain,
# found again by their exact text.
set -eu

prog=pipeconnect-outbound-rule
table=pipeconnect

usage() {
    sed -n '/^#   outbound-rule.sh add/,/^#   --backend/s/^# \{0,1\}//p' "$0" >&2
    exit 2
}

fail() {
    echo "$prog: $*" >&2
    exit 1
}

[ $# -ge 1 ] || usage
action=$1
shift
case $action in
    add | delete | print | show) ;;
    *) usage ;;
esac

mta_user=
except_user=
mark=
port=10025
ipv6=no
backend=

while [ $# -gt 0 ]; do
    case $1 in
        --mta-user | --except-user | --mark | --port | --backend)
            [ $# -ge 2 ] || fail "$1 needs a value"
            case $1 in
                --mta-user) mta_user=$2 ;;
                --except-user) except_user=$2 ;;
                --mark) mark=$2 ;;
                --port) port=$2 ;;
                --backend) backend=$2 ;;
            esac
            shift 2
            ;;
        --ipv6)
            ipv6=yes
            shift
            ;;
        *) fail "unknown option: $1 (see $0)" ;;
    esac
done

case $port in
    '' | *[!0-9]*) fail "--port: not a port number: $port" ;;
esac
[ "$port" -ge 1 ] && [ "$port" -le 65535 ] || fail "--port: not a port number: $port"
for user in "$mta_user" "$except_user"; do
    case $user in
        *[!A-Za-z0-9._-]*) fail "not a user name or uid: $user" ;;
    esac
done
case $mark in
    '') ;;
    0x*) case ${mark#0x} in '' | *[!0-9A-Fa-f]*) fail "--mark: not a number: $mark" ;; esac ;;
    0 | *[!0-9]*) fail "--mark: not a number above 0: $mark" ;;
esac
if [ -n "$mta_user" ] && [ -n "$except_user" ]; then
    fail "--mta-user and --except-user exclude each other"
fi
if [ -z "$mta_user$except_user$mark" ]; then
    fail "say whose connections to redirect: --mta-user, --except-user or --mark"
fi
if [ -z "$backend" ]; then
    if command -v nft >/dev/null 2>&1; then backend=nft; else backend=iptables; fi
fi
case $backend in
    nft | iptables) ;;
    *) fail "--backend: nft or iptables, not $backend" ;;
esac

families=ip
[ "$ipv6" = no ] || families="ip ip6"

# ------------------------------------------------------------------ nftables

nft_ruleset() { # $1: ip or ip6
    printf 'table %s %s {\n' "$1" "$table"
    printf '\tchain outbound {\n'
    # nft 1.0.6 refuses "priority dstnat" on the output hook: -100 is its value
    printf '\t\ttype nat hook output priority -100; policy accept;\n'
    [ -z "$mark" ] || printf '\t\tmeta mark %s return\n' "$mark"
    if [ -n "$mta_user" ]; then
        printf '\t\tmeta skuid %s tcp dport 25 redirect to :%s\n' "$mta_user" "$port"
    elif [ -n "$except_user" ]; then
        printf '\t\tmeta skuid != %s tcp dport 25 redirect to :%s\n' "$except_user" "$port"
    else
        printf '\t\ttcp dport 25 redirect to :%s\n' "$port"
    fi
    printf '\t}\n}\n'
}

nft_run() {
    for family in $families; do
        case $action in
            print) nft_ruleset "$family" ;;
            add)
                # create-then-delete makes the replacement atomic, with or without an old table
                {
                    printf 'table %s %s\ndelete table %s %s\n' "$family" "$table" "$family" "$table"
                    nft_ruleset "$family"
                } | nft -f - || fail "nft refused the $family rule"
                ;;
            delete)
                if nft list table "$family" "$table" >/dev/null 2>&1; then
                    nft delete table "$family" "$table"
                fi
                ;;
            show) nft list table "$family" "$table" 2>/dev/null || echo "# no $family $table table" ;;
        esac
    done
}

# ------------------------------------------------------------------ iptables

# Each rule is "TOOL MATCH..." for the nat OUTPUT chain, in order.
ipt_rules() { # $1: iptables or ip6tables; calls ipt_one TOOL ARGS...
    if [ -n "$mark" ]; then
        ipt_one "$1" -p tcp --dport 25 -m mark --mark "$mark" -j RETURN
    fi
    if [ -n "$mta_user" ]; then
        ipt_one "$1" -p tcp --dport 25 -m owner --uid-owner "$mta_user" -j REDIRECT --to-ports "$port"
    elif [ -n "$except_user" ]; then
        ipt_one "$1" -p tcp --dport 25 -m owner ! --uid-owner "$except_user" -j REDIRECT --to-ports "$port"
    else
        ipt_one "$1" -p tcp --dport 25 -j REDIRECT --to-ports "$port"
    fi
}

ipt_one() {
    tool=$1
    shift
    case $step in
        print) echo "$tool -t nat -A OUTPUT $*" ;;
        append) "$tool" -t nat -A OUTPUT "$@" || fail "$tool refused: -A OUTPUT $*" ;;
        remove)
            while "$tool" -t nat -C OUTPUT "$@" 2>/dev/null; do
                "$tool" -t nat -D OUTPUT "$@"
            done
            ;;
    esac
}

ipt_run() {
    for family in $families; do
        tool=iptables
        [ "$family" = ip ] || tool=ip6tables
        case $action in
            print)
                step=print
                ipt_rules "$tool"
                ;;
            add)
                step=remove
                ipt_rules "$tool"
                step=append
                ipt_rules "$tool"
                ;;
            delete)
                step=remove
                ipt_rules "$tool"
                ;;
            show) "$tool" -t nat -S OUTPUT ;;
        esac
    done
}

if [ "$backend" = nft ]; then nft_run; else ipt_run; fi
