"""The planner's inputs: the GPU catalog, the model, the workload, the cluster file and
measured profiles, parsed and validated into frozen values. Errors name the field
they are about (``fleet.nodes[3].gpu_type``) and what is allowed.

Reading files happens here, at the edge (cluster files, model configs, traces,
profiles); nothing below ``planner.core`` touches a file.
"""
