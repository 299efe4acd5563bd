# usage.js in Python (py-transform): Onomondo usage events as a compact record for the fleet
# system; a SIM past its label's data budget (the `budgets` lookup table) goes to the
# alerts destination as well. Other event types are dropped.
def transform(event):
    e = event["body"]
    if e["type"] != "usage":
        return DROP
    event["metadata"]["iccid"] = e["iccid"]
    event["body"] = {
        "iccid": e["iccid"],
        "at": e["time"],
        "kb": round(e["bytes"] / 100) / 10,
        "network": f"{e['network']['name']} ({e['network']['mcc']}-{e['network']['mnc']})",
    }
    budget = lookup("budgets", e.get("sim_label") or "")
    if budget and e["bytes"] > int(budget["bytes"]):
        event["body"]["over_budget_by"] = e["bytes"] - int(budget["bytes"])
        event["destinations"] = ["fleet", "alerts"]
