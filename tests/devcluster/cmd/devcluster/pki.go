package main

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// pki holds the paths of all generated certificates and keys.
type pki struct {
	Dir string

	CACert, CAKey string

	APIServerCert, APIServerKey           string
	AdminCert, AdminKey                   string
	KCMCert, KCMKey                       string
	SchedulerCert, SchedulerKey           string
	KubeletClientCert, KubeletClientKey   string // apiserver -> kubelet
	NodeCert, NodeKey                     string // node -> apiserver
	KubeletServingCert, KubeletServingKey string
	SAKey, SAPub                          string
}

type certAuthority struct {
	cert *x509.Certificate
	key  crypto.Signer
}

func newKey() (*ecdsa.PrivateKey, error) {
	return ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		panic(err)
	}
	return n
}

func writePEM(path, typ string, der []byte, mode os.FileMode) error {
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), mode)
}

func writeKey(path string, key crypto.Signer) error {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	return writePEM(path, "PRIVATE KEY", der, 0o600)
}

func (ca *certAuthority) issue(dir, name, cn string, orgs []string, usages []x509.ExtKeyUsage, dns []string, ips []net.IP) (certPath, keyPath string, err error) {
	key, err := newKey()
	if err != nil {
		return "", "", err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: cn, Organization: orgs},
		NotBefore:    now.Add(-1 * time.Hour),
		NotAfter:     now.Add(365 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  usages,
		DNSNames:     dns,
		IPAddresses:  ips,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, key.Public(), ca.key)
	if err != nil {
		return "", "", err
	}
	certPath = filepath.Join(dir, name+".crt")
	keyPath = filepath.Join(dir, name+".key")
	if err := writePEM(certPath, "CERTIFICATE", der, 0o644); err != nil {
		return "", "", err
	}
	if err := writeKey(keyPath, key); err != nil {
		return "", "", err
	}
	return certPath, keyPath, nil
}

// generatePKI creates a fresh CA and all component certificates in dir.
func generatePKI(dir, nodeName string) (*pki, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	p := &pki{Dir: dir}

	caKey, err := newKey()
	if err != nil {
		return nil, err
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "devcluster-ca"},
		NotBefore:             now.Add(-1 * time.Hour),
		NotAfter:              now.Add(10 * 365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, caKey.Public(), caKey)
	if err != nil {
		return nil, err
	}
	caCert, err := x509.ParseCertificate(caDER)
	if err != nil {
		return nil, err
	}
	p.CACert = filepath.Join(dir, "ca.crt")
	p.CAKey = filepath.Join(dir, "ca.key")
	if err := writePEM(p.CACert, "CERTIFICATE", caDER, 0o644); err != nil {
		return nil, err
	}
	if err := writeKey(p.CAKey, caKey); err != nil {
		return nil, err
	}
	ca := &certAuthority{cert: caCert, key: caKey}

	server := []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
	client := []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	loop := []net.IP{net.ParseIP("127.0.0.1")}

	type job struct {
		name, cn string
		orgs     []string
		usages   []x509.ExtKeyUsage
		dns      []string
		ips      []net.IP
		cert     *string
		key      *string
	}
	jobs := []job{
		{"apiserver", "kube-apiserver", nil, server,
			[]string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"},
			[]net.IP{net.ParseIP("127.0.0.1"), net.ParseIP("10.96.0.1")}, &p.APIServerCert, &p.APIServerKey},
		{"admin", "kubernetes-admin", []string{"system:masters"}, client, nil, nil, &p.AdminCert, &p.AdminKey},
		{"kube-controller-manager", "system:kube-controller-manager", nil, client, nil, nil, &p.KCMCert, &p.KCMKey},
		{"kube-scheduler", "system:kube-scheduler", nil, client, nil, nil, &p.SchedulerCert, &p.SchedulerKey},
		{"apiserver-kubelet-client", "kube-apiserver-kubelet-client", []string{"system:masters"}, client, nil, nil, &p.KubeletClientCert, &p.KubeletClientKey},
		{"node", "system:node:" + nodeName, []string{"system:nodes"}, client, nil, nil, &p.NodeCert, &p.NodeKey},
		{"kubelet-serving", "system:node:" + nodeName, []string{"system:nodes"}, server, []string{"localhost", nodeName}, loop, &p.KubeletServingCert, &p.KubeletServingKey},
	}
	for _, j := range jobs {
		c, k, err := ca.issue(dir, j.name, j.cn, j.orgs, j.usages, j.dns, j.ips)
		if err != nil {
			return nil, fmt.Errorf("issue %s: %w", j.name, err)
		}
		*j.cert, *j.key = c, k
	}

	// ServiceAccount token signing key (RSA, as the most widely supported).
	saKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, err
	}
	p.SAKey = filepath.Join(dir, "sa.key")
	p.SAPub = filepath.Join(dir, "sa.pub")
	if err := writePEM(p.SAKey, "RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(saKey), 0o600); err != nil {
		return nil, err
	}
	pubDER, err := x509.MarshalPKIXPublicKey(&saKey.PublicKey)
	if err != nil {
		return nil, err
	}
	if err := writePEM(p.SAPub, "PUBLIC KEY", pubDER, 0o644); err != nil {
		return nil, err
	}
	return p, nil
}
