from studies.run import main

main()
