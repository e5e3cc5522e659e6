#!/bin/sh
# Make a private CA, a server certificate for localhost/127.0.0.1 and a client certificate,
# for trying TLS and mutual TLS with `vpp serve` (see docs/service-tls.toml).
#   sh docs/make-certs.sh certs/
# Production deployments use certificates from their own CA instead.
set -eu
out="${1:-certs}"
mkdir -p "$out"
cd "$out"
openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj "/CN=vpp test CA" \
    -keyout ca.key -out ca.pem 2>/dev/null
for who in server client; do
    openssl req -newkey rsa:2048 -nodes -subj "/CN=vpp $who" -keyout "$who.key" -out "$who.csr" 2>/dev/null
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=%s\n' \
        "$([ "$who" = server ] && echo serverAuth || echo clientAuth)" > "$who.ext"
    openssl x509 -req -in "$who.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 365 \
        -extfile "$who.ext" -out "$who.pem" 2>/dev/null
    rm "$who.csr" "$who.ext"
done
echo "wrote $out/ca.pem, server.pem/.key, client.pem/.key"
