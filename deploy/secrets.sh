#!/usr/bin/env bash
# Make the secrets a tradecopy cluster needs, into a directory OUTSIDE git:
#   - a CA and one certificate for the NATS nodes (clients and routes), valid for the compose
#     hostnames, the Kubernetes service names and this machine;
#   - one nkey per role (admin, replicator, operator, api, quotes, ledger, billing, signals):
#     <role>.nk holds the SEED
#     (the secret), nkeys.env the PUBLIC keys (TC_NKEY_*) that the NATS servers admit;
#   - one for the compose bridge connector (connector-bridge-1.nk, TC_NKEY_CONNECTOR_BRIDGE_1);
#   - the PostgreSQL password (postgres-password) and database.env, the ledger's
#     TRADECOPY_DATABASE_URL with it (compose: the postgres service, db-migrate, the ledgers,
#     the API, billing and the signals worker);
#   - api.env: the API's TRADECOPY_API_JWT_SECRET and TRADECOPY_API_MASTER_KEY (random);
#   - billing.env: billing's TRADECOPY_BILLING_KEY (random), to which the operator appends the
#     Stripe key and webhook secret sealed with it (deploy/README.md, "Billing").
#
#   bash deploy/secrets.sh ~/.config/tradecopy/compose
#   TRADECOPY="python -m engine.cli" bash deploy/secrets.sh DIR   # without the console script
#
# The directory is made 0700: it keeps other users out. The files in it are readable by
# anyone who can enter it, because compose bind-mounts them into containers whose user is not
# yours (Kubernetes takes them with `kubectl create secret`, see deploy/README.md). Existing
# files are kept: run it again to fill in what is missing, delete a file to replace it.
set -euo pipefail

dir="${1:?usage: secrets.sh DIR (outside git)}"
tradecopy="${TRADECOPY:-tradecopy}"
days="${TC_CERT_DAYS:-825}"
mkdir -p "$dir"
chmod 0700 "$dir"
cd "$dir"
umask 022

if [ ! -f ca.crt ]; then
    openssl req -x509 -newkey rsa:3072 -nodes -keyout ca.key -out ca.crt -days "$days" \
        -subj "/CN=tradecopy NATS CA" 2>/dev/null
    chmod 0600 ca.key
fi
if [ ! -f tls.crt ]; then
    names="DNS:nats-1,DNS:nats-2,DNS:nats-3,DNS:localhost,IP:127.0.0.1"
    names="$names,DNS:nats,DNS:nats.tradecopy,DNS:nats.tradecopy.svc"
    names="$names,DNS:nats.tradecopy.svc.cluster.local"
    names="$names,DNS:*.nats-headless.tradecopy.svc.cluster.local"
    openssl req -newkey rsa:3072 -nodes -keyout tls.key -out tls.csr -subj "/CN=nats" 2>/dev/null
    # Both usages: routes present the same certificate as clients of each other.
    printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$names" > tls.ext
    openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out tls.crt \
        -days "$days" -extfile tls.ext 2>/dev/null
    rm -f tls.csr tls.ext
fi

: > nkeys.env.tmp
for role in admin replicator operator api quotes ledger billing signals; do
    if [ ! -f "$role.nk" ]; then
        # shellcheck disable=SC2086  # TRADECOPY may be a command with arguments
        $tradecopy nats nkey --seed-file "$role.nk" > /dev/null
    fi
    chmod 0644 "$role.nk"
    # shellcheck disable=SC2086
    key="$($tradecopy nats public-key --seed-file "$role.nk")"
    echo "TC_NKEY_$(echo "$role" | tr '[:lower:]' '[:upper:]')=$key" >> nkeys.env.tmp
done
# The compose bridge connector's user (profile "connectors"; deploy/README.md, "Connectors"):
# its seed, and its public key for the connector entry appended to auth.conf.
if [ ! -f connector-bridge-1.nk ]; then
    # shellcheck disable=SC2086
    $tradecopy nats nkey --seed-file connector-bridge-1.nk > /dev/null
fi
chmod 0644 connector-bridge-1.nk
# shellcheck disable=SC2086
echo "TC_NKEY_CONNECTOR_BRIDGE_1=$($tradecopy nats public-key --seed-file connector-bridge-1.nk)" \
    >> nkeys.env.tmp
# The ledger's database: the server's password, and the URL its clients use (compose
# service `postgres`, database and user `tradecopy`). URL-safe characters only.
if [ ! -f postgres-password ]; then
    (umask 077; openssl rand -hex 24 > postgres-password)
fi
chmod 0644 postgres-password
if [ ! -f database.env ]; then
    (umask 077; echo "TRADECOPY_DATABASE_URL=postgresql://tradecopy:$(cat postgres-password)@postgres:5432/tradecopy" > database.env)
fi
# The API's secrets: the JWT signing secret and the AES-256 key of the stored broker
# credentials. Losing the master key loses every stored credential: keep a copy.
if [ ! -f api.env ]; then
    (umask 077; {
        echo "TRADECOPY_API_JWT_SECRET=$(openssl rand -hex 32)"
        echo "TRADECOPY_API_MASTER_KEY=$(openssl rand -base64 32)"
    } > api.env)
fi
# Billing's key (AES-256, base64), which opens the sealed Stripe keys. The sealed key and
# webhook secret are appended by the operator (`tradecopy billing seal-secret`).
if [ ! -f billing.env ]; then
    (umask 077; {
        echo "TRADECOPY_BILLING_KEY=$(openssl rand -base64 32)"
        echo "# TRADECOPY_BILLING_STRIPE_API_KEY_SEALED=   (tradecopy billing seal-secret)"
        echo "# TRADECOPY_BILLING_WEBHOOK_SECRET_SEALED=   (tradecopy billing seal-secret)"
    } > billing.env)
fi
echo "TC_SECRETS=$PWD" >> nkeys.env.tmp
mv nkeys.env.tmp nkeys.env
echo "secrets in $PWD; public keys in $PWD/nkeys.env"
