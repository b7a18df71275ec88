#!/usr/bin/env bash
# Makes sure wgpu can find an adapter: on Linux without a Vulkan driver, installs Mesa's
# software Vulkan driver (lavapipe). A machine with a GPU driver, macOS (Metal) and Windows
# (DX12) need nothing. Idempotent; safe to run before every command.
set -euo pipefail

case "$(uname -s)" in
  Linux) ;;
  *) exit 0 ;; # Metal or DX12 come with the OS.
esac

have_vulkan() {
  ldconfig -p 2>/dev/null | grep -q 'libvulkan\.so\.1' || return 1
  local d
  for d in /usr/share/vulkan/icd.d /etc/vulkan/icd.d /usr/local/share/vulkan/icd.d \
           /usr/local/nvidia/share/vulkan/icd.d ${VK_DRIVER_FILES:+$(dirname "$VK_DRIVER_FILES")}; do
    compgen -G "$d/*.json" >/dev/null && return 0
  done
  return 1
}

if have_vulkan; then
  exit 0
fi

if ! command -v apt-get >/dev/null; then
  echo "setup: no Vulkan driver found; install your GPU's driver or Mesa's Vulkan drivers" >&2
  exit 1
fi
echo "setup: no Vulkan driver found; installing Mesa's software driver (mesa-vulkan-drivers)" >&2
bash "$(dirname "$0")/apt-install.sh" "setup: no Vulkan driver found" mesa-vulkan-drivers
have_vulkan || { echo "setup: mesa-vulkan-drivers installed but no Vulkan driver found" >&2; exit 1; }
