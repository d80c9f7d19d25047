"""The placement planner: topology + model shape + expert loads -> Plan, its cost model, baselines and report. Pure: no
Ray, no gRPC."""
