// Command health-checker judges MCPDeployment objects the way GitOps tools do, with their own libraries:
//
//   - kstatus: status.Compute from sigs.k8s.io/cli-utils (what `kubectl`-style waiters and Argo CD's
//     kstatus-based tooling use);
//   - flux: status.Compute from Flux's fork github.com/fluxcd/cli-utils (the one fluxcd/pkg/ssa waits with),
//     then the rule fluxcd/pkg/ssa's WaitForSet applies to one object: Current ends the wait successfully,
//     Failed ends it early with an error naming the object, anything else keeps waiting;
//   - argocd: the Lua health script given as the first argument, run with gopher-lua in the environment
//     Argo CD gives custom health scripts (no standard libraries but package, base and table; `obj` set
//     from the object's JSON with numbers as Lua numbers; a one-second budget), and its answer checked
//     against Argo CD's list of health codes; an object being deleted is "Progressing" without running the
//     script, as gitops-engine decides before consulting health scripts.
//
// It reads one JSON object per line on stdin and answers one JSON line per object on stdout, so a test can
// keep one process for a whole run.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"runtime/debug"
	"strings"
	"time"

	fluxstatus "github.com/fluxcd/cli-utils/pkg/kstatus/status"
	lua "github.com/yuin/gopher-lua"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	kstatus "sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type verdict struct {
	Status  string `json:"status"`
	Message string `json:"message"`
	Error   string `json:"error,omitempty"`
}

type answer struct {
	Kstatus verdict `json:"kstatus"`
	Flux    verdict `json:"flux"`
	ArgoCD  verdict `json:"argocd"`
}

func main() {
	if len(os.Args) == 2 && os.Args[1] == "--versions" {
		printVersions()
		return
	}
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: health-checker ARGOCD_HEALTH_LUA < objects.jsonl | health-checker --versions")
		os.Exit(2)
	}
	script, err := os.ReadFile(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 0, 1<<20), 16<<20)
	out := json.NewEncoder(os.Stdout)
	for in.Scan() {
		line := strings.TrimSpace(in.Text())
		if line == "" {
			continue
		}
		// Decoded as the apiserver's clients decode objects: integers stay int64.
		u := &unstructured.Unstructured{}
		var a answer
		if err := u.UnmarshalJSON([]byte(line)); err != nil {
			a.Kstatus.Error, a.Flux.Error, a.ArgoCD.Error = err.Error(), err.Error(), err.Error()
		} else {
			a = judge(u, string(script))
		}
		if err := out.Encode(a); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	}
}

func judge(u *unstructured.Unstructured, script string) answer {
	var a answer
	if res, err := kstatus.Compute(u.DeepCopy()); err != nil {
		a.Kstatus.Error = err.Error()
	} else {
		a.Kstatus = verdict{Status: string(res.Status), Message: res.Message}
	}
	if res, err := fluxstatus.Compute(u.DeepCopy()); err != nil {
		a.Flux.Error = err.Error()
	} else {
		a.Flux = fluxRule(u, res)
	}
	if u.GetDeletionTimestamp() != nil {
		// gitops-engine's GetResourceHealth answers this itself, before any health script runs.
		a.ArgoCD = verdict{Status: "Progressing", Message: "Pending deletion"}
	} else if status, message, err := argoHealth(u, script); err != nil {
		a.ArgoCD.Error = err.Error()
	} else {
		a.ArgoCD = verdict{Status: status, Message: message}
	}
	return a
}

// fluxRule is the outcome fluxcd/pkg/ssa's WaitForSet reaches for a set holding this one object: "Ready"
// (the wait succeeds), "Failed" with the error text it returns, or "Waiting". The error names the object and
// its kstatus status only; the kstatus message is reported beside it for the test to compare.
func fluxRule(u *unstructured.Unstructured, res *fluxstatus.Result) verdict {
	switch res.Status {
	case fluxstatus.CurrentStatus:
		return verdict{Status: "Ready", Message: res.Message}
	case fluxstatus.FailedStatus:
		id := fmt.Sprintf("%s/%s/%s", u.GetKind(), u.GetNamespace(), u.GetName())
		return verdict{
			Status:  "Failed",
			Message: res.Message,
			Error:   fmt.Sprintf("failed early due to stalled resources: [%s status: '%s']", id, res.Status),
		}
	default:
		return verdict{Status: "Waiting", Message: res.Message}
	}
}

var argoHealthCodes = map[string]bool{
	"Unknown": true, "Progressing": true, "Suspended": true, "Healthy": true, "Degraded": true, "Missing": true,
}

func argoHealth(u *unstructured.Unstructured, script string) (string, string, error) {
	l := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer l.Close()
	for _, lib := range []struct {
		name string
		open lua.LGFunction
	}{
		{lua.LoadLibName, lua.OpenPackage},
		{lua.BaseLibName, lua.OpenBase},
		{lua.TabLibName, lua.OpenTable},
	} {
		if err := l.CallByParam(lua.P{Fn: l.NewFunction(lib.open), NRet: 0, Protect: true}, lua.LString(lib.name)); err != nil {
			return "", "", err
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	l.SetContext(ctx)
	l.SetGlobal("obj", toLua(l, u.Object))
	if err := l.DoString(script); err != nil {
		return "", "", err
	}
	ret, ok := l.Get(-1).(*lua.LTable)
	if !ok {
		return "", "", fmt.Errorf("expect table output from Lua script, not %s", l.Get(-1).Type())
	}
	status := lua.LVAsString(ret.RawGetString("status"))
	message := lua.LVAsString(ret.RawGetString("message"))
	if !argoHealthCodes[status] {
		return "Unknown", "Lua returned an invalid health status", nil
	}
	return status, message, nil
}

// toLua converts decoded JSON the way Argo CD hands objects to health scripts: maps become tables, arrays
// become sequences, numbers become Lua numbers and null becomes nil.
func toLua(l *lua.LState, value interface{}) lua.LValue {
	switch v := value.(type) {
	case bool:
		return lua.LBool(v)
	case float64:
		return lua.LNumber(v)
	case int64:
		return lua.LNumber(v)
	case string:
		return lua.LString(v)
	case []interface{}:
		t := l.CreateTable(len(v), 0)
		for _, item := range v {
			t.Append(toLua(l, item))
		}
		return t
	case map[string]interface{}:
		t := l.CreateTable(0, len(v))
		for key, item := range v {
			t.RawSetH(lua.LString(key), toLua(l, item))
		}
		return t
	}
	return lua.LNil
}

func printVersions() {
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return
	}
	for _, dep := range info.Deps {
		switch dep.Path {
		case "sigs.k8s.io/cli-utils", "github.com/fluxcd/cli-utils", "github.com/yuin/gopher-lua":
			fmt.Printf("%s %s\n", dep.Path, dep.Version)
		}
	}
}
