#!/usr/bin/env bash
# Copy the tradecopy bridge sources into a terminal's MQL folder (Windows via Git Bash/WSL,
# or a Wine prefix on a Linux terminal farm). Compiling stays MetaEditor's job (README.md).
#
#   bridge_ea/install.sh mt5 "<data folder>/MQL5" [path/to/64-bit/libzmq.dll]
#   bridge_ea/install.sh mt4 "<data folder>/MQL4" [path/to/32-bit/libzmq.dll]
#
# Layout it creates:
#   MQL5/Include/Tradecopy/*.mqh   MQL5/Experts/Tradecopy/TradecopyBridge.mq5
#   MQL5/Services/Tradecopy/TradecopyService.mq5   MQL5/Libraries/libzmq.dll
#   MQL4/Include/Tradecopy/*.mqh   MQL4/Experts/TradecopyBridge.mq4
#   MQL4/Scripts/TradecopyLoop.mq4 MQL4/Libraries/libzmq.dll
set -euo pipefail

usage() {
    echo "usage: $0 mt5|mt4 <MQL5-or-MQL4 folder> [libzmq.dll]" >&2
    exit 2
}

[[ $# -ge 2 && $# -le 3 ]] || usage
platform=$1
target=$2
dll=${3:-}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

[[ -d $target ]] || { echo "no such folder: $target" >&2; exit 1; }

case $platform in
    mt5)
        mkdir -p "$target/Include/Tradecopy" "$target/Experts/Tradecopy" "$target/Services/Tradecopy" "$target/Libraries"
        cp "$here"/common/*.mqh "$here"/mql5/*.mqh "$target/Include/Tradecopy/"
        cp "$here/mql5/TradecopyBridge.mq5" "$target/Experts/Tradecopy/"
        cp "$here/mql5/TradecopyService.mq5" "$target/Services/Tradecopy/"
        ;;
    mt4)
        mkdir -p "$target/Include/Tradecopy" "$target/Experts" "$target/Scripts" "$target/Libraries"
        cp "$here"/common/*.mqh "$here"/mql4/*.mqh "$target/Include/Tradecopy/"
        cp "$here/mql4/TradecopyBridge.mq4" "$target/Experts/"
        cp "$here/mql4/TradecopyLoop.mq4" "$target/Scripts/"
        ;;
    *)
        usage
        ;;
esac

if [[ -n $dll ]]; then
    [[ -f $dll ]] || { echo "no such file: $dll" >&2; exit 1; }
    cp "$dll" "$target/Libraries/libzmq.dll"
    # a libzmq built with CURVE support needs libsodium.dll next to it
    if [[ -f "$(dirname "$dll")/libsodium.dll" ]]; then
        cp "$(dirname "$dll")/libsodium.dll" "$target/Libraries/"
    fi
fi

echo "installed the $platform bridge into $target; now compile it in MetaEditor (README.md, 'Compile')"
