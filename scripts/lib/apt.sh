# Sourced by pmvm's build and test scripts: installs the Debian packages a script is missing.
#   apt_need NAME PKG...   NAME prefixes every line (the calling script's name).
# As root with apt-get, installs PKG... (nothing when the list is empty); otherwise prints one line
# naming the packages and the command that installs them, and exits 1.
apt_need() {
  local who=$1
  shift
  (($#)) || return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "$who: error: missing $*; install (apt-get install $*) and rerun" >&2
    exit 1
  fi
  echo "$who: installing $*" >&2
  apt-get update -qq >&2 || { echo "$who: error: apt-get update failed" >&2; exit 1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2 ||
    { echo "$who: error: apt-get install $* failed" >&2; exit 1; }
}
