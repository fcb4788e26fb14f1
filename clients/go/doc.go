// Package clusterconnect reaches a Kubernetes cluster's API through a clusterconnect relay from Go,
// without the client proxy: Dial opens one tunnelled connection (a ClientTunnel.Dial stream, see
// protos/clusterconnect/v1/tunnel.proto) and RESTConfig plugs Dial into client-go, so a clientset,
// watches, exec and port-forward over WebSocket all go through the relay.
//
//	relay, err := clusterconnect.ConnectRelay("relay.example.com:8443", "ca.crt")
//	config := clusterconnect.RESTConfig(relay, "prod", clusterconnect.TokenFile("token"))
//	pods, err := kubernetes.NewForConfigOrDie(config).CoreV1().Pods("").List(ctx, metav1.ListOptions{})
//
// Inside a tunnel the far end is the cluster's auth proxy, which speaks plain HTTP/1.1 (the relay's
// TLS protects the bytes on the way), so the rest.Config's host is http:// and TLS settings in it
// are not used. The generated stubs of every service are in the clusterconnectv1 package.
package clusterconnect
