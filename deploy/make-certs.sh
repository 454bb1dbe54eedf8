#!/usr/bin/env bash
# Make a private CA and the TLS certificates of one imgsim cluster (Dask checks that every peer's
# certificate is signed by the cluster's CA, not its host name):
#   ca.pem                        the CA certificate, given to everyone
#   cluster.pem, cluster-key.pem  the scheduler's and the workers' certificate
#   client.pem, client-key.pem    imgsim's (the driver's) certificate
#   ca-key.pem                    the CA's key: keep it off the cluster, it signs new certificates
# usage: deploy/make-certs.sh [DIR]   (default ./tls; DAYS=365 sets the validity)
set -euo pipefail

dir=${1:-tls}
days=${DAYS:-365}
mkdir -p "$dir"
cd "$dir"
umask 077

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days "$days" \
    -subj "/CN=imgsim-ca" -keyout ca-key.pem -out ca.pem 2>/dev/null
for role in cluster client; do
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=imgsim-$role" \
        -keyout "$role-key.pem" -out "$role.csr" 2>/dev/null
    # Workers both accept and open connections: every certificate serves both ends.
    printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n' \
        > "$role.ext"
    openssl x509 -req -in "$role.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial \
        -days "$days" -extfile "$role.ext" -out "$role.pem" 2>/dev/null
    rm "$role.csr" "$role.ext"
done
rm -f ca.srl
chmod 644 ca.pem cluster.pem client.pem
echo "wrote $(pwd)/{ca,cluster,client}.pem and their keys"
