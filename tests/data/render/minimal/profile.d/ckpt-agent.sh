# generated from minimal.yaml by `ckpt render`; do not edit: edit minimal.yaml and render again
# Installed as /etc/profile.d/ckpt-agent.sh: `ckpt` on every login shell's PATH, and so in batch jobs submitted from
# one. /opt/ckpt-agent/bin holds only the `ckpt` command, never the venv's python or pip.
case ":${PATH}:" in
  *:/opt/ckpt-agent/bin:*) ;;
  *) PATH="${PATH:+${PATH}:}/opt/ckpt-agent/bin"; export PATH ;;
esac
